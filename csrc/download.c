/* download.c: byte-range transfers over libcurl (see download.h).
 *
 * dn_fetch keeps one curl easy handle per connection slot and reuses it from
 * job to job, so the connections stay open (keep-alive). Jobs are taken in
 * order by whichever slot is free: Python cuts large files into many ranges,
 * so a fast connection takes more of them and the last ranges of a file do
 * not wait on one slow connection. A job's bytes go straight to its file with
 * pwrite at start + done; nothing is buffered beyond curl's own buffer.
 *
 * Built with DS_NO_CURL (setup.py, where libcurl's headers are missing, as on
 * an offline GPU machine), both entry points fail with a message that says how
 * to get downloads back; everything else of the core is unaffected. */
#define _GNU_SOURCE
#include "download.h"

#include <stdlib.h>
#include <string.h>

#ifndef DS_NO_CURL
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static struct curl_slist *header_list(const char *const *headers, size_t n) {
    struct curl_slist *list = NULL;
    for (size_t i = 0; i < n; i++) {
        struct curl_slist *next = curl_slist_append(list, headers[i]);
        if (!next) {
            curl_slist_free_all(list);
            return NULL;
        }
        list = next;
    }
    return list;
}

/* Settings shared by every request: redirects followed (libcurl does not send
 * Authorization to another host after a redirect unless told to), no signals
 * (we run on a thread without the GIL). */
static void common_options(CURL *h, struct curl_slist *headers) {
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 30L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "diffsynth_c");
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
}

/* ---- dn_fetch ------------------------------------------------------------ */

typedef struct {
    CURL *handle;
    dn_job *job; /* NULL when the slot is free */
    int write_failed_errno;
    int too_long;
    char range[64];
} slot;

static size_t write_body(char *data, size_t size, size_t nmemb, void *arg) {
    slot *s = arg;
    dn_job *job = s->job;
    size_t len = size * nmemb;
    long code = 0;
    curl_easy_getinfo(s->handle, CURLINFO_RESPONSE_CODE, &code);
    int64_t asked = job->start + job->done - job->written_now;
    if (code == 200 && asked > 0 && job->written_now == 0) {
        /* A full body for a range request: start over when the job is the
         * whole file, else let Python fall back to one whole-file job. */
        if (job->start != 0) {
            job->ignored_range = 1;
            return 0;
        }
        job->done = 0;
    }
    int64_t pos = job->start + job->done;
    if (job->end >= 0 && pos + (int64_t)len > job->end) {
        s->too_long = 1;
        return 0;
    }
    size_t off = 0;
    while (off < len) {
        ssize_t w = pwrite(job->fd, data + off, len - off, (off_t)(pos + (int64_t)off));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            s->write_failed_errno = errno;
            return 0;
        }
        off += (size_t)w;
    }
    job->done += (int64_t)len;
    job->written_now += (int64_t)len;
    return len;
}

static void start_job(CURLM *multi, slot *s, dn_job *job, struct curl_slist *headers, double stall) {
    s->job = job;
    s->write_failed_errno = 0;
    s->too_long = 0;
    job->state = DN_RUNNING;
    job->attempts++;
    job->written_now = 0;
    CURL *h = s->handle;
    curl_easy_reset(h);
    common_options(h, headers);
    curl_easy_setopt(h, CURLOPT_URL, job->url);
    curl_easy_setopt(h, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (long)(stall < 1 ? 1 : stall));
    curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024L);
    int64_t from = job->start + job->done;
    if (job->end >= 0)
        snprintf(s->range, sizeof s->range, "%" PRId64 "-%" PRId64, from, job->end - 1);
    else
        snprintf(s->range, sizeof s->range, "%" PRId64 "-", from);
    if (from > 0 || job->end >= 0)
        curl_easy_setopt(h, CURLOPT_RANGE, s->range);
    if (job->fresh) {
        /* the last reply left its connection in an unknown state (see finish_job) */
        curl_easy_setopt(h, CURLOPT_FRESH_CONNECT, 1L);
        curl_easy_setopt(h, CURLOPT_FORBID_REUSE, 1L);
    }
    curl_multi_add_handle(multi, h);
}

static int retriable(CURLcode rc, long code) {
    if (rc == CURLE_HTTP_RETURNED_ERROR)
        return code == 429 || code >= 500;
    return rc == CURLE_COULDNT_CONNECT || rc == CURLE_PARTIAL_FILE || rc == CURLE_RECV_ERROR ||
           rc == CURLE_SEND_ERROR || rc == CURLE_OPERATION_TIMEDOUT || rc == CURLE_GOT_NOTHING ||
           rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_SSL_CONNECT_ERROR || rc == CURLE_HTTP2 ||
           rc == CURLE_HTTP2_STREAM;
}

/* Settles a finished request: done, retry later, or failed. Returns -1 with
 * *err set when the failure must stop everything (the disk refused a write). */
static int finish_job(slot *s, CURLcode rc, int retries, ds_error *err) {
    dn_job *job = s->job;
    long code = 0, connects = 0;
    curl_easy_getinfo(s->handle, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_getinfo(s->handle, CURLINFO_NUM_CONNECTS, &connects);
    job->status = code;
    s->job = NULL;
    if (s->write_failed_errno)
        return ds_fail_os(err, s->write_failed_errno, "cannot write: %s", strerror(s->write_failed_errno));
    /* A range that got all its bytes is done even when the connection then
     * failed (a Content-Length that promised more than the range). */
    int complete =
        !s->too_long && !job->ignored_range && (job->end >= 0 ? job->start + job->done == job->end : rc == CURLE_OK);
    if (complete) {
        job->state = DN_DONE;
        return 0;
    }
    if (job->ignored_range) {
        snprintf(job->msg, sizeof job->msg, "the server ignored the Range header");
    } else if (s->too_long) {
        snprintf(job->msg, sizeof job->msg, "the server sent more bytes than the %" PRId64 " asked for",
                 job->end - job->start);
    } else if (rc == CURLE_OK) {
        snprintf(job->msg, sizeof job->msg, "the body ended after %" PRId64 " of %" PRId64 " bytes", job->done,
                 job->end - job->start);
    } else if (rc == CURLE_HTTP_RETURNED_ERROR) {
        snprintf(job->msg, sizeof job->msg, "HTTP %ld", code);
    } else {
        snprintf(job->msg, sizeof job->msg, "%s", curl_easy_strerror(rc));
    }
    /* A short body is a lie about Content-Length or a dropped connection, a
     * long one a server that lost count: all are worth another try, resuming
     * where the trusted bytes stopped, on a fresh connection. A reply whose
     * Content-Length was short of its body left the rest in the socket, so the
     * next request on that kept-alive connection reads garbage ("Unsupported
     * protocol"): any transport failure on a reused connection is retried on a
     * new one. */
    int reused = connects == 0 && rc != CURLE_HTTP_RETURNED_ERROR;
    if (s->too_long)
        job->done -= job->written_now; /* a reply of the wrong length: none of its bytes are trusted */
    int again = !job->ignored_range && (s->too_long || rc == CURLE_OK || retriable(rc, code) || reused);
    job->fresh = s->too_long || rc == CURLE_OK || reused;
    if (again && job->attempts <= retries) {
        double backoff = 0.2 * (double)(1 << (job->attempts < 6 ? job->attempts - 1 : 5));
        job->retry_at = now_seconds() + backoff;
        job->state = DN_PENDING;
        return 0;
    }
    job->state = DN_FAILED;
    return 0;
}

int dn_fetch(dn_job *jobs, size_t n_jobs, const char *const *headers, size_t n_headers, int connections, int retries,
             double stall_seconds, dn_poll_fn poll, void *poll_arg, ds_error *err) {
    pthread_once(&curl_once, curl_init_once);
    if (connections < 1)
        connections = 1;
    if ((size_t)connections > n_jobs)
        connections = n_jobs ? (int)n_jobs : 1;
    int rc = -1;
    CURLM *multi = curl_multi_init();
    slot *slots = calloc((size_t)connections, sizeof *slots);
    struct curl_slist *list = header_list(headers, n_headers);
    if (!multi || !slots || (n_headers && !list)) {
        ds_fail(err, DS_ERR_NOMEM, "cannot set up the transfers");
        goto done;
    }
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)connections);
    for (int i = 0; i < connections; i++) {
        slots[i].handle = curl_easy_init();
        if (!slots[i].handle) {
            ds_fail(err, DS_ERR_NOMEM, "cannot set up the transfers");
            goto done;
        }
    }
    for (size_t i = 0; i < n_jobs; i++) {
        jobs[i].state = DN_PENDING;
        jobs[i].attempts = 0;
        jobs[i].retry_at = 0;
        jobs[i].msg[0] = 0;
        jobs[i].ignored_range = 0;
        jobs[i].fresh = 0;
        if (jobs[i].end >= 0 && jobs[i].start + jobs[i].done >= jobs[i].end)
            jobs[i].state = DN_DONE;
    }
    double last_poll = now_seconds();
    for (;;) {
        double now = now_seconds();
        int waiting = 0, running = 0;
        for (int i = 0; i < connections; i++)
            running += slots[i].job != NULL;
        for (size_t j = 0; j < n_jobs; j++) {
            if (jobs[j].state != DN_PENDING)
                continue;
            waiting++;
            if (running >= connections || jobs[j].retry_at > now)
                continue;
            for (int i = 0; i < connections; i++) {
                if (!slots[i].job) {
                    start_job(multi, &slots[i], &jobs[j], list, stall_seconds);
                    running++;
                    break;
                }
            }
        }
        if (!running && !waiting)
            break;
        int still = 0;
        CURLMcode mc = curl_multi_perform(multi, &still);
        if (mc != CURLM_OK) {
            ds_fail(err, DS_ERR_OS, "curl: %s", curl_multi_strerror(mc));
            goto done;
        }
        CURLMsg *m;
        int left, finished = 0;
        while ((m = curl_multi_info_read(multi, &left))) {
            if (m->msg != CURLMSG_DONE)
                continue;
            for (int i = 0; i < connections; i++) {
                if (slots[i].handle == m->easy_handle && slots[i].job) {
                    CURLcode result = m->data.result;
                    curl_multi_remove_handle(multi, slots[i].handle);
                    finished++;
                    if (finish_job(&slots[i], result, retries, err))
                        goto done;
                    break;
                }
            }
        }
        /* A freed slot takes its next job at once, not after a poll timeout. */
        if (!finished)
            curl_multi_poll(multi, NULL, 0, still ? 50 : 20, NULL);
        now = now_seconds();
        if (poll && now - last_poll >= 0.1) {
            last_poll = now;
            int64_t bytes = 0;
            for (size_t j = 0; j < n_jobs; j++)
                bytes += jobs[j].done;
            if (poll(poll_arg, bytes)) {
                ds_fail(err, DS_ERR_INTERRUPTED, "interrupted");
                goto done;
            }
        }
    }
    rc = 0;
done:
    if (slots) {
        for (int i = 0; i < connections; i++) {
            if (!slots[i].handle)
                continue;
            if (slots[i].job) {
                curl_multi_remove_handle(multi, slots[i].handle);
                slots[i].job->state = DN_PENDING;
            }
            curl_easy_cleanup(slots[i].handle);
        }
    }
    free(slots);
    if (multi)
        curl_multi_cleanup(multi);
    curl_slist_free_all(list);
    return rc;
}

/* ---- dn_get --------------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap, max;
} membuf;

static int membuf_add(membuf *b, const char *data, size_t len) {
    if (b->len + len > b->max)
        return -1;
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *p = realloc(b->buf, cap);
        if (!p)
            return -1;
        b->buf = p;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, data, len);
    b->len += len;
    b->buf[b->len] = 0;
    return 0;
}

static size_t write_mem(char *data, size_t size, size_t nmemb, void *arg) {
    return membuf_add(arg, data, size * nmemb) ? 0 : size * nmemb;
}

static size_t write_header(char *data, size_t size, size_t nmemb, void *arg) {
    membuf *b = arg;
    size_t len = size * nmemb;
    /* A new status line (after a redirect) starts a new header block. */
    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0)
        b->len = 0;
    return membuf_add(b, data, len) ? 0 : len;
}

int dn_get(const char *url, const char *const *headers, size_t n_headers, size_t max_body, dn_reply *reply,
           ds_error *err) {
    pthread_once(&curl_once, curl_init_once);
    memset(reply, 0, sizeof *reply);
    membuf body = {NULL, 0, 0, max_body}, head = {NULL, 0, 0, 1 << 20};
    struct curl_slist *list = header_list(headers, n_headers);
    CURL *h = curl_easy_init();
    int rc = -1;
    if (!h || (n_headers && !list)) {
        ds_fail(err, DS_ERR_NOMEM, "cannot set up the request");
        goto done;
    }
    common_options(h, list);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_mem);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, write_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &head);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 120L);
    CURLcode c = curl_easy_perform(h);
    if (c != CURLE_OK) {
        ds_fail(err, DS_ERR_OS, "%s", c == CURLE_WRITE_ERROR ? "reply too large" : curl_easy_strerror(c));
        err->errnum = 0;
        goto done;
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &reply->status);
    char *final = NULL;
    curl_easy_getinfo(h, CURLINFO_EFFECTIVE_URL, &final);
    reply->final_url = strdup(final ? final : url);
    reply->body = body.buf ? body.buf : calloc(1, 1);
    reply->body_len = body.len;
    reply->headers = head.buf ? head.buf : calloc(1, 1);
    reply->headers_len = head.len;
    body.buf = head.buf = NULL;
    if (!reply->final_url || !reply->body || !reply->headers) {
        dn_reply_free(reply);
        ds_fail(err, DS_ERR_NOMEM, "out of memory");
        goto done;
    }
    rc = 0;
done:
    free(body.buf);
    free(head.buf);
    if (h)
        curl_easy_cleanup(h);
    curl_slist_free_all(list);
    return rc;
}

#else /* DS_NO_CURL */

#define DN_NO_CURL_MSG                                                                                                 \
    "this build of diffsynth_c has no libcurl, so it cannot download: install libcurl's headers "                      \
    "(Debian: libcurl4-openssl-dev) and rebuild"

int dn_fetch(dn_job *jobs, size_t n_jobs, const char *const *headers, size_t n_headers, int connections, int retries,
             double stall_seconds, dn_poll_fn poll, void *poll_arg, ds_error *err) {
    (void)jobs, (void)n_jobs, (void)headers, (void)n_headers, (void)connections, (void)retries, (void)stall_seconds;
    (void)poll, (void)poll_arg;
    return ds_fail(err, DS_ERR_UNSUPPORTED, DN_NO_CURL_MSG);
}

int dn_get(const char *url, const char *const *headers, size_t n_headers, size_t max_body, dn_reply *reply,
           ds_error *err) {
    (void)url, (void)headers, (void)n_headers, (void)max_body;
    memset(reply, 0, sizeof *reply);
    return ds_fail(err, DS_ERR_UNSUPPORTED, DN_NO_CURL_MSG);
}

#endif /* DS_NO_CURL */

void dn_reply_free(dn_reply *reply) {
    free(reply->headers);
    free(reply->body);
    free(reply->final_url);
    memset(reply, 0, sizeof *reply);
}
