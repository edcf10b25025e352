/* json.h: a strict, allocation-light JSON reader for headers of untrusted files.
 *
 * Not a DOM: a cursor walks the bytes and the caller pulls the shape it expects
 * (an object of objects for safetensors, an index's weight_map, ...). Values the
 * caller does not want are still validated by js_skip_value, so a document is
 * accepted exactly when serde_json (the parser behind the safetensors library)
 * accepts it: RFC 8259 grammar, whitespace only space/tab/CR/LF, no control
 * characters in strings, escaped surrogates paired, numbers whose value
 * overflows a double rejected, and at most JS_MAX_DEPTH containers open at once.
 * The input must already be valid UTF-8 (js_utf8_valid).
 *
 * Every function returns 0 on success and -1 after filling the cursor's error. */
#ifndef DS_JSON_H
#define DS_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* serde_json's recursion limit, as measured against safetensors: 127 nested
 * containers parse, 128 fail. */
#define JS_MAX_DEPTH 127

typedef struct {
    const uint8_t *start, *p, *end;
    int depth;
    const char *doc; /* what the document is, for messages ("header") */
    ds_error *err;
} js_cursor;

/* A growable byte buffer for decoded strings. Owns data; free with js_buf_free. */
typedef struct {
    char *data;
    size_t len, cap;
} js_buf;

void js_buf_free(js_buf *b);

/* Returns the offset of the first byte that is not valid UTF-8 (as Rust's
 * str::from_utf8 defines it), or len when all of buf is valid. */
size_t js_utf8_check(const uint8_t *buf, size_t len);

void js_init(js_cursor *c, const uint8_t *buf, size_t len, const char *doc, ds_error *err);

/* Skips whitespace; returns the next byte, or -1 at the end. Never fails. */
int js_peek(js_cursor *c);

/* Opens a container: the next value must start with `open` ('{' or '['). */
int js_enter(js_cursor *c, char open);

/* Inside a container opened by js_enter: sets *more to 1 when another element
 * (or member) follows and to 0 when the container closed (the closing bracket
 * is consumed). *index counts elements seen so far and is advanced here. */
int js_next(js_cursor *c, char close, size_t *index, int *more);

/* After a member's key: consumes the ':' separator. */
int js_colon(js_cursor *c);

/* Parses a string. The decoded UTF-8 replaces out's contents when out is not
 * NULL (it is NUL-terminated for convenience; embedded NULs are possible). */
int js_string(js_cursor *c, js_buf *out);

/* Parses a non-negative integer literal that fits in 64 bits (serde's usize on a
 * 64-bit machine): no sign, fraction or exponent. The message for anything else
 * names the value as "<context> '<name>': <what>" (context and name may be NULL);
 * it is formatted only on failure. */
int js_u64(js_cursor *c, uint64_t *out, const char *context, const char *name, const char *what);

/* Validates and skips any value. */
int js_skip_value(js_cursor *c);

/* Requires that only whitespace remains. */
int js_finish(js_cursor *c);

/* A short description of the JSON type starting at the next byte, for messages
 * ("a string", "a number", ...). */
const char *js_kind(js_cursor *c);

/* Fails with "<doc> at byte N: <message>" (N is the cursor's offset). */
int js_error(js_cursor *c, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif
