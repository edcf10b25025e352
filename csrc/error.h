/* error.h: the one error record every C part of diffsynth_c fills in.
 *
 * Parsers and I/O routines never touch Python. On failure they return nonzero
 * and describe what went wrong in a ds_error: a status (which Python exception
 * the binding raises), the errno when the OS refused something, and a message
 * that already names the tensor key and the offending values. The binding in
 * module.c prefixes the file name and raises. */
#ifndef DS_ERROR_H
#define DS_ERROR_H

#include <stddef.h>

typedef enum {
    DS_OK = 0,
    DS_ERR_FORMAT,      /* the bytes break the file format: ValueError (FormatError) */
    DS_ERR_OS,          /* the OS refused (open, read, map): OSError with errnum */
    DS_ERR_NOMEM,       /* an allocation failed: MemoryError */
    DS_ERR_UNSUPPORTED, /* valid file, but something we cannot represent: ValueError */
    DS_ERR_INTERRUPTED, /* a signal handler raised (Ctrl-C) while we waited */
} ds_status;

typedef struct {
    ds_status status;
    int errnum;     /* errno for DS_ERR_OS, else 0 */
    int input;      /* which input (file) the error belongs to, when a task knows; else -1 */
    char msg[1024]; /* what is wrong, with key and values; no file name */
} ds_error;

/* Fills err (status, errnum 0) with a printf-style message. Returns -1 so that
 * callers can write `return ds_fail(err, ...)`. */
int ds_fail(ds_error *err, ds_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Like ds_fail with DS_ERR_OS and the given errno. */
int ds_fail_os(ds_error *err, int errnum, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#endif
