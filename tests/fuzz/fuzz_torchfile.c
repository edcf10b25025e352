/* libFuzzer harness: a whole torch.save checkpoint (zip directory, data.pkl through the restricted
 * unpickler, storages checked against the archive), written to an in-memory file first. */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "torchfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int fd = memfd_create("checkpoint", 0);
    if (fd < 0)
        return 0;
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0)
            break;
        done += (size_t)n;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ds_error err;
    tf_checkpoint c;
    if (done == size && tf_open(path, NULL, &c, &err) == 0)
        tf_close(&c);
    close(fd);
    return 0;
}
