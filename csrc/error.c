/* error.c: filling a ds_error (see error.h). */
#include "error.h"

#include <stdarg.h>
#include <stdio.h>

int ds_fail(ds_error *err, ds_status status, const char *fmt, ...) {
    va_list ap;
    err->status = status;
    err->errnum = 0;
    err->input = -1;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int ds_fail_os(ds_error *err, int errnum, const char *fmt, ...) {
    va_list ap;
    err->status = DS_ERR_OS;
    err->errnum = errnum;
    err->input = -1;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return -1;
}
