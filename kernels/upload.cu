/* upload.cu: the GPU load path (dsk_upload) and the small host-side entry points.
 *
 * The bytes of the items are cut into pieces that fill a ring of pinned staging slots. Reader
 * threads pread the pieces (page cache -> pinned memory, the only CPU copy); the calling thread
 * waits for each slot to fill, in order, and queues on a copy stream of its own: the slot's
 * host-to-device copies, straight into the result tensors for pieces kept as they are, or into a
 * device scratch slot followed by one convert kernel for pieces that change dtype, so the bus
 * carries the file's bytes. Then it records the slot's event; readers refill a slot only after
 * that event has completed. With at least two slots, the copy of one slot overlaps the reads of
 * the next ones. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <new>
#include <vector>

#include "common.cuh"
#include "internal.cuh"

#define READ_UNIT ((uint64_t)4 << 20) /* largest single pread */
#define MAX_SLOTS 8
#define MAX_DEVICES 64

/* ---- process-wide resources, kept between loads ---- */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* one upload at a time owns the pool */
static void *g_pinned;
static size_t g_pinned_bytes;
static cudaStream_t g_stream[MAX_DEVICES];
static cudaEvent_t g_events[MAX_DEVICES][MAX_SLOTS + 1];

static int pinned_pool(size_t bytes, char *err, size_t errlen) {
    if (g_pinned_bytes >= bytes)
        return 0;
    if (g_pinned) {
        cudaFreeHost(g_pinned);
        g_pinned = NULL;
        g_pinned_bytes = 0;
    }
    if (dsk_check(cudaHostAlloc(&g_pinned, bytes, cudaHostAllocPortable), "load: cudaHostAlloc of the staging buffers",
                  err, errlen))
        return -1;
    g_pinned_bytes = bytes;
    return 0;
}

static int device_streams(int device, char *err, size_t errlen) {
    if (device < 0 || device >= MAX_DEVICES)
        return dsk_fail(err, errlen, "load: device %d out of range", device);
    if (g_stream[device])
        return 0;
    if (dsk_check(cudaStreamCreateWithFlags(&g_stream[device], cudaStreamNonBlocking), "load: cudaStreamCreate", err,
                  errlen))
        return -1;
    for (int i = 0; i <= MAX_SLOTS; i++)
        if (dsk_check(cudaEventCreateWithFlags(&g_events[device][i], cudaEventDisableTiming), "load: cudaEventCreate",
                      err, errlen))
            return -1;
    return 0;
}

/* ---- the plan ---- */

struct piece {
    size_t item;
    uint64_t in_off;    /* bytes into the item */
    uint64_t len;       /* bytes read */
    uint64_t stage_off; /* bytes into the slot */
    int convert;
};

struct chunk {
    size_t first_piece, n_pieces;
    uint64_t data_bytes;  /* staged bytes, [0, data_bytes) of the slot, alignment gaps included */
    uint64_t read_bytes;  /* bytes its pieces read: the slot is full when readers have read these */
    uint64_t table_bytes; /* convert table at the end of the slot */
    int n_convert;
};

struct unit { /* one pread */
    size_t chunk;
    size_t piece;
    uint64_t off; /* bytes into the piece */
    uint64_t len;
};

struct job {
    const dsk_item *items;
    std::vector<piece> pieces;
    std::vector<chunk> chunks;
    std::vector<unit> units;
    size_t slot_bytes;
    int nslots;
    uint8_t *pinned;
    /* shared state, under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t next_unit;
    size_t released;              /* chunks whose slot may be refilled: chunk k may start when k < released + nslots */
    std::vector<uint64_t> filled; /* bytes read per chunk */
    int failed;
    size_t bad_item;
    char msg[512];
};

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* Cuts the items into pieces and the pieces into chunks of one slot each. */
static int plan(job &j, size_t n, char *err, size_t errlen) {
    const size_t tentry = sizeof(dsk_piece);
    chunk cur = {0, 0, 0, 0, 0, 0};
    auto close_chunk = [&]() {
        if (cur.n_pieces) {
            j.chunks.push_back(cur);
        }
        cur = chunk{j.pieces.size(), 0, 0, 0, 0, 0};
    };
    for (size_t i = 0; i < n; i++) {
        const dsk_item &it = j.items[i];
        int conv = it.src_t >= 0 && it.src_t != it.dst_t;
        uint64_t es = conv ? dsk_size(it.src_t) : 1;
        if (conv && (it.src_t >= DSK_NTYPES || it.dst_t < 0 || it.dst_t >= DSK_NTYPES))
            return dsk_fail(err, errlen, "load: item %zu: unsupported dtype pair %d -> %d", i, it.src_t, it.dst_t);
        if (conv && it.nbytes % es)
            return dsk_fail(err, errlen, "load: item %zu: %llu bytes is not a whole number of elements", i,
                            (unsigned long long)it.nbytes);
        uint64_t done = 0;
        while (done < it.nbytes) {
            uint64_t start = conv ? align_up(cur.data_bytes, 16) : cur.data_bytes;
            uint64_t table = conv ? (uint64_t)(cur.n_convert + 1) * tentry : (uint64_t)cur.n_convert * tentry;
            uint64_t room =
                j.slot_bytes > start + align_up(table, 256) ? j.slot_bytes - start - align_up(table, 256) : 0;
            room -= room % es;
            if (room < es || (room < (64u << 10) && room < it.nbytes - done)) { /* too little left: next slot */
                if (!cur.n_pieces)
                    return dsk_fail(err, errlen, "load: staging slot of %zu bytes is too small", j.slot_bytes);
                close_chunk();
                continue;
            }
            uint64_t len = it.nbytes - done < room ? it.nbytes - done : room;
            j.pieces.push_back(piece{i, done, len, start, conv});
            cur.n_pieces++;
            cur.data_bytes = start + len;
            cur.read_bytes += len;
            if (conv) {
                cur.n_convert++;
                cur.table_bytes = align_up((uint64_t)cur.n_convert * tentry, 256);
            }
            done += len;
        }
    }
    close_chunk();
    for (size_t c = 0; c < j.chunks.size(); c++) {
        const chunk &ch = j.chunks[c];
        for (size_t p = ch.first_piece; p < ch.first_piece + ch.n_pieces; p++)
            for (uint64_t off = 0; off < j.pieces[p].len; off += READ_UNIT) {
                uint64_t len = j.pieces[p].len - off < READ_UNIT ? j.pieces[p].len - off : READ_UNIT;
                j.units.push_back(unit{c, p, off, len});
            }
    }
    return 0;
}

/* ---- readers ---- */

static void fail_job(job &j, size_t item, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_job(job &j, size_t item, const char *fmt, ...) {
    pthread_mutex_lock(&j.mu);
    if (!j.failed) {
        j.failed = 1;
        j.bad_item = item;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j.msg, sizeof j.msg, fmt, ap);
        va_end(ap);
    }
    pthread_cond_broadcast(&j.cv);
    pthread_mutex_unlock(&j.mu);
}

static void *reader(void *arg) {
    job &j = *(job *)arg;
    for (;;) {
        pthread_mutex_lock(&j.mu);
        size_t u = j.next_unit;
        if (u >= j.units.size() || j.failed) {
            pthread_mutex_unlock(&j.mu);
            return NULL;
        }
        j.next_unit++;
        const unit &un = j.units[u];
        while (!j.failed && un.chunk >= j.released + (size_t)j.nslots)
            pthread_cond_wait(&j.cv, &j.mu);
        int stop = j.failed;
        pthread_mutex_unlock(&j.mu);
        if (stop)
            return NULL;
        const piece &pc = j.pieces[un.piece];
        const dsk_item &it = j.items[pc.item];
        uint8_t *dst = j.pinned + (un.chunk % j.nslots) * j.slot_bytes + pc.stage_off + un.off;
        uint64_t want = un.len, at = it.offset + pc.in_off + un.off;
        while (want) {
            ssize_t got = pread(it.fd, dst, want, (off_t)at);
            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0) {
                if (got < 0)
                    fail_job(j, pc.item, "read at offset %llu: %s", (unsigned long long)at, strerror(errno));
                else
                    fail_job(j, pc.item, "the file ends before offset %llu (truncated since its header was read?)",
                             (unsigned long long)at);
                return NULL;
            }
            dst += got;
            at += (uint64_t)got;
            want -= (uint64_t)got;
        }
        pthread_mutex_lock(&j.mu);
        j.filled[un.chunk] += un.len;
        pthread_cond_broadcast(&j.cv);
        pthread_mutex_unlock(&j.mu);
    }
}

/* ---- the submitting thread ---- */

static int submit_chunk(job &j, size_t c, uint8_t *scratch, cudaStream_t s, dsk_rules rules, char *err, size_t errlen) {
    const chunk &ch = j.chunks[c];
    size_t slot = c % j.nslots;
    uint8_t *host = j.pinned + slot * j.slot_bytes;
    uint8_t *dev = scratch ? scratch + slot * j.slot_bytes : NULL;
    if (ch.n_convert) {
        if (!dev)
            return dsk_fail(err, errlen, "load: a conversion needs device scratch memory");
        dsk_piece *table = (dsk_piece *)(host + j.slot_bytes - ch.table_bytes);
        unsigned tiles = 0;
        int k = 0;
        for (size_t p = ch.first_piece; p < ch.first_piece + ch.n_pieces; p++) {
            const piece &pc = j.pieces[p];
            if (!pc.convert)
                continue;
            const dsk_item &it = j.items[pc.item];
            uint64_t es_in = dsk_size(it.src_t), es_out = dsk_size(it.dst_t);
            dsk_piece e;
            e.src_off = pc.stage_off;
            e.dst = (uint8_t *)it.dst + pc.in_off / es_in * es_out;
            e.n = pc.len / es_in;
            e.tile_begin = tiles;
            e.src_t = it.src_t;
            e.dst_t = it.dst_t;
            e.pad = 0;
            table[k++] = e;
            tiles += dsk_piece_tiles(e.n);
        }
        if (dsk_check(cudaMemcpyAsync(dev, host, ch.data_bytes, cudaMemcpyHostToDevice, s), "load: cudaMemcpyAsync",
                      err, errlen) ||
            dsk_check(
                cudaMemcpyAsync(dev + j.slot_bytes - ch.table_bytes, table, ch.table_bytes, cudaMemcpyHostToDevice, s),
                "load: cudaMemcpyAsync", err, errlen) ||
            dsk_launch_pieces((const dsk_piece *)(dev + j.slot_bytes - ch.table_bytes), k, tiles, dev, rules, s, err,
                              errlen))
            return -1;
    }
    for (size_t p = ch.first_piece; p < ch.first_piece + ch.n_pieces; p++) {
        const piece &pc = j.pieces[p];
        if (pc.convert)
            continue;
        const dsk_item &it = j.items[pc.item];
        if (dsk_check(
                cudaMemcpyAsync((uint8_t *)it.dst + pc.in_off, host + pc.stage_off, pc.len, cudaMemcpyHostToDevice, s),
                "load: cudaMemcpyAsync", err, errlen))
            return -1;
    }
    return 0;
}

static int run_job(job &j, int device, uint8_t *scratch, dsk_rules rules, cudaStream_t caller, int threads, char *err,
                   size_t errlen) {
    cudaStream_t s = g_stream[device];
    cudaEvent_t *ev = g_events[device];
    /* the result tensors were allocated in the caller's stream order: start after its queued work */
    if (dsk_check(cudaEventRecord(ev[MAX_SLOTS], caller), "load: cudaEventRecord", err, errlen) ||
        dsk_check(cudaStreamWaitEvent(s, ev[MAX_SLOTS], 0), "load: cudaStreamWaitEvent", err, errlen))
        return -1;
    size_t nthreads = (size_t)(threads < 1 ? 1 : threads);
    if (nthreads > j.units.size())
        nthreads = j.units.size() ? j.units.size() : 1;
    std::vector<pthread_t> tids(nthreads);
    size_t started = 0;
    for (; started < nthreads; started++)
        if (pthread_create(&tids[started], NULL, reader, &j))
            break;
    int rc = 0;
    if (!started) {
        rc = dsk_fail(err, errlen, "load: cannot start reader threads");
        fail_job(j, (size_t)-1, "cannot start reader threads");
    }
    for (size_t c = 0; !rc && c < j.chunks.size(); c++) {
        pthread_mutex_lock(&j.mu);
        while (!j.failed && j.filled[c] < j.chunks[c].read_bytes)
            pthread_cond_wait(&j.cv, &j.mu);
        int failed = j.failed;
        pthread_mutex_unlock(&j.mu);
        if (failed) {
            rc = dsk_fail(err, errlen, "%s", j.msg);
            break;
        }
        if (submit_chunk(j, c, scratch, s, rules, err, errlen) ||
            dsk_check(cudaEventRecord(ev[c % j.nslots], s), "load: cudaEventRecord", err, errlen)) {
            rc = -1;
            fail_job(j, (size_t)-1, "%s", err);
            break;
        }
        /* free the slot the readers need next: chunk c+1's slot last held chunk c+1-nslots */
        if (c + 1 >= (size_t)j.nslots && c + 1 < j.chunks.size()) {
            if (dsk_check(cudaEventSynchronize(ev[(c + 1) % j.nslots]), "load: copy to the device", err, errlen)) {
                rc = -1;
                fail_job(j, (size_t)-1, "%s", err);
                break;
            }
        }
        pthread_mutex_lock(&j.mu);
        j.released = c + 2 >= (size_t)j.nslots ? c + 2 - (size_t)j.nslots : 0;
        pthread_cond_broadcast(&j.cv);
        pthread_mutex_unlock(&j.mu);
    }
    for (size_t t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
    /* the staging slots are reused by the next load: wait for everything queued on them */
    cudaError_t sync = cudaStreamSynchronize(s);
    if (rc == 0 && dsk_check(sync, "load: copy to the device", err, errlen))
        rc = -1;
    return rc;
}

extern "C" int dsk_upload(int device, const dsk_item *items, size_t n, void *scratch, size_t scratch_bytes, int threads,
                          dsk_rules rules, void *stream, size_t *failed_item, char *err, size_t errlen) {
    *failed_item = (size_t)-1;
    if (n == 0)
        return 0;
    dsk_device_guard guard;
    if (guard.enter(device, err, errlen))
        return -1;
    int nslots = scratch_bytes >= ((size_t)64 << 20) ? 4 : 2;
    size_t slot_bytes = scratch_bytes / nslots / 4096 * 4096;
    if (slot_bytes < ((size_t)1 << 20))
        return dsk_fail(err, errlen, "load: %zu bytes of staging is too little (1 MiB per slot at least)",
                        scratch_bytes);
    int rc;
    try {
        job j;
        j.items = items;
        j.slot_bytes = slot_bytes;
        j.nslots = nslots;
        if (plan(j, n, err, errlen))
            return -1;
        j.filled.assign(j.chunks.size(), 0);
        j.next_unit = 0;
        j.released = 0;
        j.failed = 0;
        j.bad_item = (size_t)-1;
        j.msg[0] = 0;
        pthread_mutex_init(&j.mu, NULL);
        pthread_cond_init(&j.cv, NULL);
        pthread_mutex_lock(&g_lock);
        rc = pinned_pool((size_t)nslots * slot_bytes, err, errlen);
        if (!rc)
            rc = device_streams(device, err, errlen);
        if (!rc) {
            j.pinned = (uint8_t *)g_pinned;
            rc = run_job(j, device, (uint8_t *)scratch, rules, (cudaStream_t)stream, threads, err, errlen);
            if (rc && j.failed)
                *failed_item = j.bad_item;
        }
        pthread_mutex_unlock(&g_lock);
        pthread_cond_destroy(&j.cv);
        pthread_mutex_destroy(&j.mu);
    } catch (const std::bad_alloc &) {
        return dsk_fail(err, errlen, "load: out of host memory while planning %zu items", n);
    }
    return rc;
}

/* ---- small entry points ---- */

extern "C" int dsk_abi_version(void) { return DSK_ABI_VERSION; }

extern "C" int dsk_device_count(char *err, size_t errlen) {
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess) {
        dsk_check(rc, "cudaGetDeviceCount", err, errlen);
        return 0;
    }
    return n;
}
