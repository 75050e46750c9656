/*
 * cn_ws: the WebSocket wire format. See include/cn_ws.h.
 *
 * RFC 6455 section 5.2 frame layout:
 *   byte 0: FIN, RSV1-3, opcode
 *   byte 1: MASK, payload length (7 bits: 0-125, 126 = 16-bit length
 *           follows, 127 = 64-bit length follows)
 *   then the masking key (4 bytes) when MASK is set, then the payload.
 * No extension is negotiated, so every RSV bit must be 0.
 */
#include "cn_ws.h"

#include <string.h>

#include <openssl/evp.h>

static const char s_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

static int
s_parse (uint8_t *buf, size_t len, size_t max_payload, cn_ws_frame_t *f,
         uint16_t *code, const char **why, bool server)
{
    if (len < 2)
        return 0;
    uint8_t b0 = buf[0], b1 = buf[1];
    bool fin = (b0 & 0x80) != 0;
    uint8_t op = b0 & 0x0f;
    bool masked = (b1 & 0x80) != 0;
    uint64_t plen = b1 & 0x7f;
    size_t hlen = 2;

    *code = CN_WS_CLOSE_PROTOCOL;
    if (b0 & 0x70) {
        *why = "reserved bits set (no extension was negotiated)";
        return -1;
    }
    if (!(op <= CN_WS_OP_BINARY || (op >= CN_WS_OP_CLOSE && op <= CN_WS_OP_PONG))) {
        *why = "unknown opcode";
        return -1;
    }
    if (server && !masked) {
        *why = "client frames must be masked";
        return -1;
    }
    if (!server && masked) {
        *why = "server frames must not be masked";
        return -1;
    }
    bool control = op >= CN_WS_OP_CLOSE;
    if (control && (!fin || plen > 125)) {
        *why = "control frames must be final and at most 125 bytes";
        return -1;
    }
    if (plen == 126) {
        if (len < 4)
            return 0;
        plen = ((uint64_t) buf[2] << 8) | buf[3];
        hlen = 4;
    }
    else
    if (plen == 127) {
        if (len < 10)
            return 0;
        if (buf[2] & 0x80) {
            *why = "payload length has its most significant bit set";
            return -1;
        }
        plen = 0;
        for (int i = 2; i < 10; i++)
            plen = (plen << 8) | buf[i];
        hlen = 10;
    }
    if (plen > max_payload) {
        *code = CN_WS_CLOSE_TOO_BIG;
        *why = "frame larger than 1 MiB";
        return -1;
    }
    uint8_t key[4] = { 0, 0, 0, 0 };
    if (masked) {
        if (len < hlen + 4)
            return 0;
        memcpy (key, buf + hlen, 4);
        hlen += 4;
    }
    if (len - hlen < plen)
        return 0;
    f->fin = fin;
    f->opcode = op;
    f->masked = masked;
    f->payload = buf + hlen;
    f->len = (size_t) plen;
    f->size = hlen + (size_t) plen;
    if (masked)
        cn_ws_mask (f->payload, f->len, key);
    *code = 0;
    *why = NULL;
    return 1;
}

int
cn_ws_parse (uint8_t *buf, size_t len, size_t max_payload, cn_ws_frame_t *f,
             uint16_t *code, const char **why)
{
    return s_parse (buf, len, max_payload, f, code, why, true);
}

int
cn_ws_parse_client (uint8_t *buf, size_t len, size_t max_payload, cn_ws_frame_t *f,
                    uint16_t *code, const char **why)
{
    return s_parse (buf, len, max_payload, f, code, why, false);
}

static size_t
s_header (uint8_t *out, uint8_t opcode, size_t len, uint8_t maskbit)
{
    out[0] = (uint8_t) (0x80 | (opcode & 0x0f));
    if (len <= 125) {
        out[1] = (uint8_t) (maskbit | len);
        return 2;
    }
    if (len <= 0xffff) {
        out[1] = (uint8_t) (maskbit | 126);
        out[2] = (uint8_t) (len >> 8);
        out[3] = (uint8_t) len;
        return 4;
    }
    out[1] = (uint8_t) (maskbit | 127);
    uint64_t l = len;
    for (int i = 9; i >= 2; i--) {
        out[i] = (uint8_t) l;
        l >>= 8;
    }
    return 10;
}

size_t
cn_ws_header (uint8_t *out, uint8_t opcode, size_t len)
{
    return s_header (out, opcode, len, 0);
}

size_t
cn_ws_header_masked (uint8_t *out, uint8_t opcode, size_t len, const uint8_t key[4])
{
    size_t n = s_header (out, opcode, len, 0x80);
    memcpy (out + n, key, 4);
    return n + 4;
}

void
cn_ws_mask (uint8_t *data, size_t len, const uint8_t key[4])
{
    for (size_t i = 0; i < len; i++)
        data[i] ^= key[i & 3];
}

size_t
cn_ws_close_payload (uint8_t *out, uint16_t code, const char *reason)
{
    out[0] = (uint8_t) (code >> 8);
    out[1] = (uint8_t) code;
    size_t n = reason ? strlen (reason) : 0;
    if (n > 123) {
        n = 123;
        /* do not cut a UTF-8 sequence: back up over continuation bytes */
        while (n > 0 && ((unsigned char) reason[n] & 0xc0) == 0x80)
            n--;
    }
    if (n)
        memcpy (out + 2, reason, n);
    return 2 + n;
}

bool
cn_ws_accept_key (const char *key, size_t len, char out[29])
{
    /* 16 random bytes in base64: 22 characters and "==" */
    if (!key || len != 24 || key[22] != '=' || key[23] != '=')
        return false;
    for (size_t i = 0; i < 22; i++) {
        char c = key[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
              || c == '+' || c == '/'))
            return false;
    }
    char buf[24 + sizeof s_guid];
    memcpy (buf, key, 24);
    memcpy (buf + 24, s_guid, sizeof s_guid - 1);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_Digest (buf, 24 + sizeof s_guid - 1, md, &mdlen, EVP_sha1 (), NULL) != 1
        || mdlen != 20)
        return false;
    /* 20 bytes -> 28 characters + NUL */
    return EVP_EncodeBlock ((unsigned char *) out, md, 20) == 28;
}
