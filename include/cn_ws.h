/*
 * cn_ws: the WebSocket wire format (RFC 6455) for the agent session: the
 * opening handshake's accept key and the frame codec. Pure functions, no I/O
 * and no allocation, so a session costs no per-connection framing state
 * beyond what the caller keeps (wslay keeps ~8.5 KiB of buffers per
 * connection; see docs/sessions.md, "Memory per session").
 *
 * Reading (server side): frames from a client must be masked.
 *
 *   cn_ws_frame_t f;
 *   uint16_t code; const char *why;
 *   int rc = cn_ws_parse (buf, len, CN_WS_MAX_MESSAGE, &f, &code, &why);
 *   rc == 1: a whole frame: f.payload (unmasked in place), f.len; consume f.size bytes
 *   rc == 0: need more bytes (nothing changed)
 *   rc < 0: protocol error: close with `code` and the static text `why`
 *
 * Writing: cn_ws_header () for an unmasked server frame; the masked variant
 * and cn_ws_mask () are for clients (test tools, mockcloud).
 */
#ifndef CN_WS_H
#define CN_WS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CN_WS_MAX_MESSAGE (1024 * 1024)   /* proto/session.md: frames over 1 MiB -> 1009 */
#define CN_WS_MAX_HEADER 14

enum {
    CN_WS_OP_CONT = 0x0, CN_WS_OP_TEXT = 0x1, CN_WS_OP_BINARY = 0x2,
    CN_WS_OP_CLOSE = 0x8, CN_WS_OP_PING = 0x9, CN_WS_OP_PONG = 0xA
};

/* Close codes used by the session protocol (proto/session.md). */
enum {
    CN_WS_CLOSE_NORMAL = 1000, CN_WS_CLOSE_GOING_AWAY = 1001, CN_WS_CLOSE_PROTOCOL = 1002,
    CN_WS_CLOSE_POLICY = 1008, CN_WS_CLOSE_TOO_BIG = 1009, CN_WS_CLOSE_INTERNAL = 1011,
    CN_WS_CLOSE_FENCED = 4001, CN_WS_CLOSE_TIMEOUT = 4002,
    CN_WS_CLOSE_DUPLICATE = 4003
};

typedef struct {
    bool fin;
    uint8_t opcode;
    bool masked;
    uint8_t *payload;         /* inside the caller's buffer, unmasked */
    size_t len;               /* payload bytes */
    size_t size;              /* header + payload: what to consume */
} cn_ws_frame_t;

/* Parse one frame at buf[0..len). Server side: unmasked frames, reserved
 * bits, unknown opcodes, fragmented or long (> 125) control frames are
 * protocol errors (1002); a payload over max_payload is 1009 and is
 * reported as soon as the header is complete, before the payload arrives.
 * Returns 1 (frame complete, payload unmasked in place), 0 (incomplete:
 * buf unchanged) or -1 (*code and *why set; why is a static string). */
int cn_ws_parse (uint8_t *buf, size_t len, size_t max_payload, cn_ws_frame_t *f,
                 uint16_t *code, const char **why);

/* Same, for a client reading server frames: frames must NOT be masked. */
int cn_ws_parse_client (uint8_t *buf, size_t len, size_t max_payload, cn_ws_frame_t *f,
                        uint16_t *code, const char **why);

/* Write a final (FIN) unmasked frame header for a payload of len bytes into
 * out (CN_WS_MAX_HEADER bytes); returns the header length. */
size_t cn_ws_header (uint8_t *out, uint8_t opcode, size_t len);

/* Client frames: header with the mask bit and the 4-byte key. */
size_t cn_ws_header_masked (uint8_t *out, uint8_t opcode, size_t len, const uint8_t key[4]);

/* XOR data with the masking key (RFC 6455 5.3), starting at key offset 0. */
void cn_ws_mask (uint8_t *data, size_t len, const uint8_t key[4]);

/* A close frame's payload: 2-byte code, then reason truncated to fit the
 * 125-byte control frame limit (on a UTF-8 boundary). out >= 125 bytes.
 * Returns the payload length. */
size_t cn_ws_close_payload (uint8_t *out, uint16_t code, const char *reason);

/* Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64 (SHA-1 (key + GUID)).
 * out >= 29 bytes (28 characters and NUL). false when the key is not 16
 * bytes of base64 (RFC 6455 4.2.1: 24 characters). */
bool cn_ws_accept_key (const char *key, size_t len, char out[29]);

#endif
