/* torchfile.h: a torch.save checkpoint (zip + data.pkl), read without running any of its code.
 *
 * tf_open reads the zip directory, checks byteorder and the format version records, runs data.pkl
 * through the restricted pickle machine and ties every storage to its data/<key> entry. Before it
 * returns, every tensor is checked to lie inside its storage and every storage inside its entry,
 * so that a load can take the bytes as they are. Only the directory and data.pkl are read. The
 * checks visit each pickle object once (objects may be shared, or form cycles), so they cost time
 * linear in data.pkl. */
#ifndef DS_TORCHFILE_H
#define DS_TORCHFILE_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "io.h"
#include "torchzip.h"
#include "unpickle.h"

#define TF_MAX_PICKLE ((uint64_t)1 << 30)
/* the archive format versions torch's reader accepts (caffe2/serialize/inline_container.h) */
#define TF_MIN_VERSION 1
#define TF_MAX_VERSION 10

typedef struct {
    io_file f;
    int opened;
    tz_archive zip;
    pk_result pk;
    uint64_t *storage_offset; /* per storage (pk.storages order): file offset of its bytes */
    uint64_t *storage_nbytes; /* bytes the storage holds */
} tf_checkpoint;

/* opt (may be NULL) goes to the pickle machine. Returns 0, or -1 with err: DS_ERR_UNSUPPORTED when the file is not a
 * zip checkpoint (legacy format) or uses what the reader does not represent; DS_ERR_FORMAT when it is malformed or
 * names a refused global; DS_ERR_INTERRUPTED when opt's poll asked to stop. The file stays open in c->f on success. */
int tf_open(const char *path, const pk_options *opt, tf_checkpoint *c, ds_error *err);
void tf_close(tf_checkpoint *c);

#endif
