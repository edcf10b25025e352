/* cuda.c: opens the CUDA library with dlopen and resolves its entry points (contract in cuda.h). */
#define _GNU_SOURCE
#include "cuda.h"

#include <dlfcn.h>
#include <stdio.h>

static cu_api g_api;
static int g_open;

static void *sym(void *lib, const char *name, char *why, size_t whylen) {
    void *p = dlsym(lib, name);
    if (!p)
        snprintf(why, whylen, "%s: missing symbol %s", "CUDA library", name);
    return p;
}

const cu_api *cu_open(const char *path, char *why, size_t whylen) {
    if (g_open)
        return &g_api;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *e = dlerror();
        snprintf(why, whylen, "cannot open %s: %s", path, e ? e : "unknown error");
        return NULL;
    }
    int (*abi)(void) = (int (*)(void))sym(lib, "dsk_abi_version", why, whylen);
    if (!abi)
        goto fail;
    if (abi() != DSK_ABI_VERSION) {
        snprintf(why, whylen, "%s was built for interface %d, this core speaks %d (rebuild the package)", path, abi(),
                 DSK_ABI_VERSION);
        goto fail;
    }
    cu_api a;
    if (!(*(void **)&a.device_count = sym(lib, "dsk_device_count", why, whylen)) ||
        !(*(void **)&a.cast = sym(lib, "dsk_cast", why, whylen)) ||
        !(*(void **)&a.rms_norm = sym(lib, "dsk_rms_norm", why, whylen)) ||
        !(*(void **)&a.layer_norm = sym(lib, "dsk_layer_norm", why, whylen)) ||
        !(*(void **)&a.upload = sym(lib, "dsk_upload", why, whylen)))
        goto fail;
    /* optional: only the test stand-in exports it (its "device" memory is host memory) */
    a.device_is_host = dlsym(lib, "dsk_fake_device_is_host") != NULL;
    g_api = a;
    g_open = 1;
    return &g_api; /* the library stays loaded for the life of the process */
fail:
    dlclose(lib);
    return NULL;
}

const cu_api *cu_get(void) { return g_open ? &g_api : NULL; }
