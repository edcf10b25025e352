/* download.h: HTTP transfers over libcurl for the model hubs (prefix dn_).
 *
 * No Python here. dn_get fetches one small reply (a JSON listing) into memory;
 * dn_fetch runs a list of byte-range jobs over a pool of connections (curl
 * multi), each job written with pwrite at its own offset of an open file, with
 * retries and backoff. Python plans the jobs (which files, how they are split,
 * what is already present), verifies the hashes and renames files into place. */
#ifndef DN_DOWNLOAD_H
#define DN_DOWNLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef enum { DN_PENDING = 0, DN_RUNNING, DN_DONE, DN_FAILED } dn_state;

typedef struct {
    const char *url; /* borrowed */
    int fd;          /* open for writing; borrowed */
    int64_t start;   /* the job covers bytes [start, end) of the file */
    int64_t end;     /* -1: up to the end of the body (size unknown) */
    int64_t done;    /* in: bytes of the range already on disk; out: bytes written */
    /* out */
    dn_state state;
    long status;       /* last HTTP status, 0 when no reply */
    int attempts;      /* requests made */
    int ignored_range; /* the server answered 200 to a range that starts past 0 */
    char msg[256];     /* why the job failed */
    /* private */
    double retry_at;
    int64_t written_now; /* bytes this request wrote */
    int fresh;           /* the next request opens its own connection and closes it after */
} dn_job;

/* Called about every 100 ms with the bytes written so far by all jobs; a
 * nonzero return stops every transfer (the jobs keep their `done`). */
typedef int (*dn_poll_fn)(void *arg, int64_t bytes);

/* Runs the jobs, at most `connections` at a time. A job that fails with a
 * connection error, a stall, 429 or 5xx is retried up to `retries` times with
 * backoff, resuming at start + done. Returns 0 when every job ended (done or
 * failed, see each job's state); sets *err and returns -1 on an interruption by
 * poll, a write error (disk full) or no memory. */
int dn_fetch(dn_job *jobs, size_t n_jobs, const char *const *headers, size_t n_headers, int connections, int retries,
             double stall_seconds, dn_poll_fn poll, void *poll_arg, ds_error *err);

typedef struct {
    long status;
    char *headers; /* raw header lines of the last reply (after redirects); caller frees */
    size_t headers_len;
    char *body; /* caller frees */
    size_t body_len;
    char *final_url; /* caller frees */
} dn_reply;

/* GETs url (redirects followed) into memory, at most max_body bytes. Returns 0
 * with *reply filled (any HTTP status), or -1 with *err set on a transport
 * error. */
int dn_get(const char *url, const char *const *headers, size_t n_headers, size_t max_body, dn_reply *reply,
           ds_error *err);

void dn_reply_free(dn_reply *reply);

#endif
