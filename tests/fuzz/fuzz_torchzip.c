/* libFuzzer harness: the zip central directory reader alone, on an in-memory file. */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "torchzip.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int fd = memfd_create("zip", 0);
    if (fd < 0)
        return 0;
    if (write(fd, data, size) == (ssize_t)size) {
        ds_error err;
        tz_archive a;
        if (tz_open(fd, size, &a, &err) == 0) {
            (void)tz_find(&a, "data.pkl");
            tz_free(&a);
        }
    }
    close(fd);
    return 0;
}
