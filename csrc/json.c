/* json.c: the strict JSON cursor (see json.h for the contract).
 *
 * Numbers: a literal without sign, fraction or exponent is an unsigned
 * integer; everything else is a float for serde_json, which rejects a float
 * whose value overflows a double ("number out of range"). We decide overflow
 * from the decimal digits alone (no strtod, so no locale and no allocation):
 * the value overflows when its decimal exponent passes 308, or equals 308 with
 * leading digits at or above those of the halfway point above DBL_MAX. */
#include "json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void js_buf_free(js_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Makes room for `more` bytes plus a NUL. Returns 0, or -1 when out of memory. */
static int buf_reserve(js_buf *b, size_t more) {
    size_t need, cap;
    if (more > SIZE_MAX - b->len - 1)
        return -1;
    need = b->len + more + 1;
    if (need <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *d = realloc(b->data, cap);
    if (!d)
        return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

size_t js_utf8_check(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            /* ASCII runs, eight bytes at a time */
            uint64_t w;
            i++;
            while (len - i >= 8) {
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ULL)
                    break;
                i += 8;
            }
            continue;
        }
        size_t n;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            n = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            if (c == 0xE0)
                lo = 0xA0; /* overlong */
            if (c == 0xED)
                hi = 0x9F; /* UTF-16 surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            if (c == 0xF0)
                lo = 0x90; /* overlong */
            if (c == 0xF4)
                hi = 0x8F; /* above U+10FFFF */
        } else
            return i;
        if (len - i - 1 < n)
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= n; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
        i += n + 1;
    }
    return len;
}

void js_init(js_cursor *c, const uint8_t *buf, size_t len, const char *doc, ds_error *err) {
    c->start = c->p = buf;
    c->end = buf + len;
    c->depth = 0;
    c->doc = doc;
    c->err = err;
}

int js_error(js_cursor *c, const char *fmt, ...) {
    char what[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return ds_fail(c->err, DS_ERR_FORMAT, "invalid JSON in %s at byte %zu: %s", c->doc, (size_t)(c->p - c->start),
                   what);
}

/* Bytes that end a run of plain string content: '"', '\\' and controls. */
static const uint8_t STRING_STOP[256] = {
    [0x00] = 1, [0x01] = 1, [0x02] = 1, [0x03] = 1, [0x04] = 1, [0x05] = 1, [0x06] = 1, [0x07] = 1, [0x08] = 1,
    [0x09] = 1, [0x0A] = 1, [0x0B] = 1, [0x0C] = 1, [0x0D] = 1, [0x0E] = 1, [0x0F] = 1, [0x10] = 1, [0x11] = 1,
    [0x12] = 1, [0x13] = 1, [0x14] = 1, [0x15] = 1, [0x16] = 1, [0x17] = 1, [0x18] = 1, [0x19] = 1, [0x1A] = 1,
    [0x1B] = 1, [0x1C] = 1, [0x1D] = 1, [0x1E] = 1, [0x1F] = 1, ['"'] = 1,  ['\\'] = 1,
};

static void skip_ws(js_cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

int js_peek(js_cursor *c) {
    skip_ws(c);
    return c->p < c->end ? *c->p : -1;
}

const char *js_kind(js_cursor *c) {
    switch (js_peek(c)) {
    case '{': return "an object";
    case '[': return "an array";
    case '"': return "a string";
    case 't':
    case 'f': return "a boolean";
    case 'n': return "null";
    case -1: return "the end of the document";
    default: return (*c->p == '-' || (*c->p >= '0' && *c->p <= '9')) ? "a number" : "an invalid token";
    }
}

int js_enter(js_cursor *c, char open) {
    if (js_peek(c) != open)
        return js_error(c, "expected %s, found %s", open == '{' ? "an object" : "an array", js_kind(c));
    if (c->depth >= JS_MAX_DEPTH)
        return js_error(c, "more than %d nested containers", JS_MAX_DEPTH);
    c->depth++;
    c->p++;
    return 0;
}

int js_next(js_cursor *c, char close, size_t *index, int *more) {
    int ch = js_peek(c);
    if (*index == 0) {
        if (ch == close) {
            c->p++;
            c->depth--;
            *more = 0;
            return 0;
        }
    } else {
        if (ch == close) {
            c->p++;
            c->depth--;
            *more = 0;
            return 0;
        }
        if (ch != ',')
            return js_error(c, ch < 0 ? "unexpected end, expected ',' or '%c'" : "expected ',' or '%c'", close);
        c->p++;
        ch = js_peek(c);
        if (ch == close)
            return js_error(c, "trailing comma");
    }
    if (ch < 0)
        return js_error(c, "unexpected end, expected a value");
    (*index)++;
    *more = 1;
    return 0;
}

int js_colon(js_cursor *c) {
    if (js_peek(c) != ':')
        return js_error(c, "expected ':' after an object key");
    c->p++;
    return 0;
}

static int hex4(const uint8_t *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned d;
        uint8_t h = p[i];
        if (h >= '0' && h <= '9')
            d = h - '0';
        else if (h >= 'a' && h <= 'f')
            d = h - 'a' + 10;
        else if (h >= 'A' && h <= 'F')
            d = h - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static int nomem(js_cursor *c) { return ds_fail(c->err, DS_ERR_NOMEM, "out of memory while parsing the %s", c->doc); }

int js_string(js_cursor *c, js_buf *out) {
    if (js_peek(c) != '"')
        return js_error(c, "expected a string, found %s", js_kind(c));
    c->p++;
    if (out)
        out->len = 0;
    for (;;) {
        const uint8_t *run = c->p;
        const uint8_t *p = c->p, *end = c->end;
        while (end - p >= 4 && !(STRING_STOP[p[0]] | STRING_STOP[p[1]] | STRING_STOP[p[2]] | STRING_STOP[p[3]]))
            p += 4;
        while (p < end && !STRING_STOP[*p])
            p++;
        c->p = p;
        if (out && c->p > run) {
            size_t n = (size_t)(c->p - run);
            if (buf_reserve(out, n))
                return nomem(c);
            memcpy(out->data + out->len, run, n);
            out->len += n;
        }
        if (c->p >= c->end)
            return js_error(c, "unexpected end inside a string");
        uint8_t ch = *c->p;
        if (ch == '"') {
            c->p++;
            break;
        }
        if (ch < 0x20)
            return js_error(c, "control character 0x%02x inside a string", ch);
        /* an escape */
        if (c->end - c->p < 2)
            return js_error(c, "unexpected end inside an escape");
        char tmp[4];
        size_t n = 1;
        switch (c->p[1]) {
        case '"': tmp[0] = '"'; break;
        case '\\': tmp[0] = '\\'; break;
        case '/': tmp[0] = '/'; break;
        case 'b': tmp[0] = '\b'; break;
        case 'f': tmp[0] = '\f'; break;
        case 'n': tmp[0] = '\n'; break;
        case 'r': tmp[0] = '\r'; break;
        case 't': tmp[0] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (c->end - c->p < 6 || hex4(c->p + 2, &cp))
                return js_error(c, "invalid \\u escape");
            if (cp >= 0xDC00 && cp <= 0xDFFF)
                return js_error(c, "lone trailing surrogate \\u%04x", cp);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (c->end - c->p < 12 || c->p[6] != '\\' || c->p[7] != 'u' || hex4(c->p + 8, &lo) || lo < 0xDC00 ||
                    lo > 0xDFFF)
                    return js_error(c, "lone leading surrogate \\u%04x", cp);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                c->p += 6;
            }
            n = put_utf8(tmp, cp);
            c->p += 4;
            break;
        }
        default: return js_error(c, "invalid escape '\\%c'", c->p[1] >= 0x20 && c->p[1] < 0x7F ? c->p[1] : '?');
        }
        c->p += 2;
        if (out) {
            if (buf_reserve(out, n))
                return nomem(c);
            memcpy(out->data + out->len, tmp, n);
            out->len += n;
        }
    }
    if (out) {
        if (buf_reserve(out, 0))
            return nomem(c);
        out->data[out->len] = '\0';
    }
    return 0;
}

/* Scans a number literal. Sets *is_uint when it is a plain unsigned integer
 * (then *u holds it, *u_overflow says it did not fit in 64 bits), and fails
 * when the literal is malformed or its value overflows a double. */
static int scan_number(js_cursor *c, int *is_uint, uint64_t *u, int *u_overflow) {
    const uint8_t *p = c->p, *e = c->end;
    int neg = 0;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    const uint8_t *int_begin = p;
    if (p >= e || *p < '0' || *p > '9') {
        c->p = p;
        return js_error(c, "invalid number");
    }
    if (*p == '0') {
        p++;
    } else {
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    const uint8_t *int_end = p;
    if (p < e && *p >= '0' && *p <= '9') {
        c->p = p;
        return js_error(c, "invalid number (leading zero)");
    }
    const uint8_t *frac_begin = p, *frac_end = p;
    if (p < e && *p == '.') {
        p++;
        frac_begin = p;
        if (p >= e || *p < '0' || *p > '9') {
            c->p = p;
            return js_error(c, "invalid number");
        }
        while (p < e && *p >= '0' && *p <= '9')
            p++;
        frac_end = p;
    }
    int has_exp = 0;
    long long exp = 0;
    if (p < e && (*p == 'e' || *p == 'E')) {
        int eneg = 0;
        has_exp = 1;
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            eneg = *p++ == '-';
        if (p >= e || *p < '0' || *p > '9') {
            c->p = p;
            return js_error(c, "invalid number");
        }
        while (p < e && *p >= '0' && *p <= '9') {
            if (exp < 1000000000LL)
                exp = exp * 10 + (*p - '0');
            p++;
        }
        if (eneg)
            exp = -exp;
    }
    *is_uint = !neg && frac_begin == frac_end && !has_exp;
    *u = 0;
    *u_overflow = 0;
    if (*is_uint) {
        for (const uint8_t *q = int_begin; q < int_end; q++) {
            unsigned d = (unsigned)(*q - '0');
            if (*u > (UINT64_MAX - d) / 10) {
                *u_overflow = 1;
                break;
            }
            *u = *u * 10 + d;
        }
    }
    /* Overflow of a double: find the first significant digit. */
    const uint8_t *first = NULL;
    long long dexp = 0; /* decimal exponent of the first significant digit */
    for (const uint8_t *q = int_begin; q < int_end; q++)
        if (*q != '0') {
            first = q;
            dexp = (long long)(int_end - q) - 1;
            break;
        }
    if (!first)
        for (const uint8_t *q = frac_begin; q < frac_end; q++)
            if (*q != '0') {
                first = q;
                dexp = -(long long)(q - frac_begin) - 1;
                break;
            }
    if (first) {
        dexp += exp;
        int over = dexp > 308;
        if (dexp == 308) {
            /* compare the leading significant digits with DBL_MAX's halfway point */
            static const char limit[21] = "17976931348623158079";
            char sig[20];
            size_t ns = 0;
            if (first < int_end)
                for (const uint8_t *q = first; q < int_end && ns < 20; q++)
                    sig[ns++] = (char)*q;
            for (const uint8_t *q = first < int_end ? frac_begin : first; q < frac_end && ns < 20; q++)
                sig[ns++] = (char)*q;
            while (ns < 20)
                sig[ns++] = '0';
            over = memcmp(sig, limit, 20) >= 0;
        }
        if (over) {
            c->p = p;
            return js_error(c, "number out of range");
        }
    }
    c->p = p;
    return 0;
}

int js_u64(js_cursor *c, uint64_t *out, const char *context, const char *name, const char *what) {
    int ch = js_peek(c);
    const char *sep = context ? " '" : "", *end = context ? "': " : "";
    if (!context)
        context = name = "";
    if (!(ch == '-' || (ch >= '0' && ch <= '9')))
        return js_error(c, "%s%s%.200s%s%s must be a non-negative integer, found %s", context, sep, name, end, what,
                        js_kind(c));
    const uint8_t *at = c->p;
    /* fast path: a short run of digits */
    uint64_t v = 0;
    const uint8_t *p = at;
    while (p < c->end && p - at < 19 && *p >= '0' && *p <= '9')
        v = v * 10 + (uint64_t)(*p++ - '0');
    if (p > at && p < c->end && !(*p >= '0' && *p <= '9') && *p != '.' && *p != 'e' && *p != 'E' &&
        !(*at == '0' && p - at > 1)) {
        c->p = p;
        *out = v;
        return 0;
    }
    int is_uint, over;
    if (scan_number(c, &is_uint, out, &over))
        return -1;
    if (!is_uint || over) {
        int len = (int)(c->p - at);
        c->p = at;
        return js_error(c, "%s%s%.200s%s%s must be a non-negative integer below 2^64, found %.*s", context, sep, name,
                        end, what, len > 40 ? 40 : len, (const char *)at);
    }
    return 0;
}

static int skip_literal(js_cursor *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return js_error(c, "invalid literal, expected '%s'", word);
    c->p += n;
    return 0;
}

int js_skip_value(js_cursor *c) {
    int ch = js_peek(c);
    switch (ch) {
    case '{': {
        size_t i = 0;
        int more;
        if (js_enter(c, '{'))
            return -1;
        for (;;) {
            if (js_next(c, '}', &i, &more))
                return -1;
            if (!more)
                return 0;
            if (js_string(c, NULL) || js_colon(c) || js_skip_value(c))
                return -1;
        }
    }
    case '[': {
        size_t i = 0;
        int more;
        if (js_enter(c, '['))
            return -1;
        for (;;) {
            if (js_next(c, ']', &i, &more))
                return -1;
            if (!more)
                return 0;
            if (js_skip_value(c))
                return -1;
        }
    }
    case '"': return js_string(c, NULL);
    case 't': return skip_literal(c, "true");
    case 'f': return skip_literal(c, "false");
    case 'n': return skip_literal(c, "null");
    case -1: return js_error(c, "unexpected end, expected a value");
    default: {
        int is_uint, over;
        uint64_t u;
        if (ch == '-' || (ch >= '0' && ch <= '9'))
            return scan_number(c, &is_uint, &u, &over);
        return js_error(c, "expected a value");
    }
    }
}

int js_finish(js_cursor *c) {
    if (js_peek(c) != -1)
        return js_error(c, "trailing characters after the JSON value");
    return 0;
}
