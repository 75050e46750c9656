/* Unit tests: lib/cn_ws.c (the WebSocket wire format, RFC 6455). */
#include "cn_test.h"
#include "cn_ws.h"

#include <stdlib.h>

static void
test_accept_key (void)
{
    /* RFC 6455 section 1.3's example */
    char out[29];
    CHECK (cn_ws_accept_key ("dGhlIHNhbXBsZSBub25jZQ==", 24, out));
    CHECK_STR (out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    CHECK (!cn_ws_accept_key ("dGhlIHNhbXBsZSBub25jZQ", 22, out));
    CHECK (!cn_ws_accept_key ("dGhlIHNhbXBsZSBub25j!Q==", 24, out));
    CHECK (!cn_ws_accept_key (NULL, 0, out));
}

/* A masked client frame of payload p. */
static size_t
s_client_frame (uint8_t *out, uint8_t op, const char *p, size_t n, bool fin)
{
    static const uint8_t key[4] = { 0x37, 0xfa, 0x21, 0x3d };
    size_t h = cn_ws_header_masked (out, op, n, key);
    if (!fin)
        out[0] &= 0x7f;
    memcpy (out + h, p, n);
    cn_ws_mask (out + h, n, key);
    return h + n;
}

static void
test_parse_masked (void)
{
    /* RFC 6455 5.7: a masked "Hello" */
    uint8_t f1[] = { 0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58 };
    cn_ws_frame_t f;
    uint16_t code;
    const char *why;
    CHECK_INT (cn_ws_parse (f1, sizeof f1, CN_WS_MAX_MESSAGE, &f, &code, &why), 1);
    CHECK (f.fin);
    CHECK_INT (f.opcode, CN_WS_OP_TEXT);
    CHECK_INT (f.len, 5);
    CHECK (memcmp (f.payload, "Hello", 5) == 0);
    CHECK_INT (f.size, sizeof f1);

    /* every prefix is "incomplete", and leaves the bytes alone */
    uint8_t buf[64];
    size_t n = s_client_frame (buf, CN_WS_OP_BINARY, "abcdef", 6, true);
    for (size_t k = 0; k < n; k++) {
        uint8_t copy[64];
        memcpy (copy, buf, n);
        CHECK_INT (cn_ws_parse (copy, k, CN_WS_MAX_MESSAGE, &f, &code, &why), 0);
        CHECK (memcmp (copy, buf, n) == 0);
    }
    CHECK_INT (cn_ws_parse (buf, n, CN_WS_MAX_MESSAGE, &f, &code, &why), 1);
    CHECK (memcmp (f.payload, "abcdef", 6) == 0);
}

static void
test_lengths (void)
{
    /* 126 and 127 length forms */
    size_t sizes[] = { 0, 125, 126, 65535, 65536, 200000 };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        char *p = malloc (n + 1);
        memset (p, 'x', n);
        uint8_t *buf = malloc (n + CN_WS_MAX_HEADER);
        size_t len = s_client_frame (buf, CN_WS_OP_BINARY, p, n, true);
        cn_ws_frame_t f;
        uint16_t code;
        const char *why;
        CHECK_INT (cn_ws_parse (buf, len, CN_WS_MAX_MESSAGE, &f, &code, &why), 1);
        CHECK_INT (f.len, n);
        CHECK (n == 0 || memcmp (f.payload, p, n) == 0);
        free (p);
        free (buf);
    }
    /* server headers */
    uint8_t h[CN_WS_MAX_HEADER];
    CHECK_INT (cn_ws_header (h, CN_WS_OP_BINARY, 125), 2);
    CHECK_INT (h[0], 0x82);
    CHECK_INT (h[1], 125);
    CHECK_INT (cn_ws_header (h, CN_WS_OP_BINARY, 126), 4);
    CHECK_INT (h[1], 126);
    CHECK_INT (cn_ws_header (h, CN_WS_OP_CLOSE, 70000), 10);
    CHECK_INT (h[0], 0x88);
    CHECK_INT (h[1], 127);
    CHECK_INT (h[9] | (h[8] << 8) | (h[7] << 16), 70000);
}

static void
test_errors (void)
{
    cn_ws_frame_t f;
    uint16_t code;
    const char *why;
    uint8_t buf[64];
    /* unmasked client frame */
    uint8_t un[] = { 0x82, 0x01, 0x00 };
    CHECK_INT (cn_ws_parse (un, sizeof un, CN_WS_MAX_MESSAGE, &f, &code, &why), -1);
    CHECK_INT (code, 1002);
    /* but fine for a client reading a server */
    CHECK_INT (cn_ws_parse_client (un, sizeof un, CN_WS_MAX_MESSAGE, &f, &code, &why), 1);
    /* reserved bits */
    size_t n = s_client_frame (buf, CN_WS_OP_BINARY, "a", 1, true);
    buf[0] |= 0x40;
    CHECK_INT (cn_ws_parse (buf, n, CN_WS_MAX_MESSAGE, &f, &code, &why), -1);
    CHECK_INT (code, 1002);
    /* unknown opcode */
    n = s_client_frame (buf, 0x3, "a", 1, true);
    CHECK_INT (cn_ws_parse (buf, n, CN_WS_MAX_MESSAGE, &f, &code, &why), -1);
    CHECK_INT (code, 1002);
    /* fragmented control frame */
    n = s_client_frame (buf, CN_WS_OP_PING, "a", 1, false);
    CHECK_INT (cn_ws_parse (buf, n, CN_WS_MAX_MESSAGE, &f, &code, &why), -1);
    CHECK_INT (code, 1002);
    /* too big: known from the header alone (no payload sent) */
    uint8_t big[] = { 0x82, 0xff, 0, 0, 0, 0, 0, 0x10, 0, 1, 1, 2, 3, 4 };
    CHECK_INT (cn_ws_parse (big, sizeof big, CN_WS_MAX_MESSAGE, &f, &code, &why), -1);
    CHECK_INT (code, 1009);
    uint8_t huge[] = { 0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0 };
    CHECK_INT (cn_ws_parse (huge, sizeof huge, CN_WS_MAX_MESSAGE, &f, &code, &why), -1);
    CHECK_INT (code, 1002);
    /* exactly the limit is fine (header says so) */
    uint8_t lim[] = { 0x82, 0xff, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4 };
    CHECK_INT (cn_ws_parse (lim, sizeof lim, CN_WS_MAX_MESSAGE, &f, &code, &why), 0);
}

static void
test_close_payload (void)
{
    uint8_t out[128];
    size_t n = cn_ws_close_payload (out, 4001, "fenced");
    CHECK_INT (n, 8);
    CHECK_INT (out[0], 4001 >> 8);
    CHECK_INT (out[1], 4001 & 0xff);
    CHECK (memcmp (out + 2, "fenced", 6) == 0);
    char longr[300];
    memset (longr, 'r', sizeof longr - 1);
    longr[sizeof longr - 1] = 0;
    CHECK_INT (cn_ws_close_payload (out, 1000, longr), 125);
    /* a 2-byte UTF-8 character across the cut is not split */
    char utf[200];
    memset (utf, 'a', 122);
    utf[122] = (char) 0xc3;
    utf[123] = (char) 0xa9;
    utf[124] = 0;
    CHECK_INT (cn_ws_close_payload (out, 1000, utf), 2 + 122);
    CHECK_INT (cn_ws_close_payload (out, 1000, NULL), 2);
}

int
main (void)
{
    RUN (test_accept_key);
    RUN (test_parse_masked);
    RUN (test_lengths);
    RUN (test_errors);
    RUN (test_close_payload);
    return cn_test_done ();
}
