/* The plain request format, and packing a part of one from the producer's side.
 *
 * A plain request (protocol.encode_request) carries submits of plain jobs
 * (no dedup key, group, dependency or tag), packed for the writer's C turn
 * (turn.h): a 16-byte head (magic, mode, item count, 0), then per item a
 * 52-byte head (id, run_at, created, backoff, timeout_ms, max_attempts, name
 * length, prio, ser, body length) followed by the name and the body.  A
 * request sent in parts is a run of frames, each a 4-byte length and then a
 * request.
 *
 * submit_batch's usual part is jobs that differ only in their arguments and
 * priority.  Their payloads are serialised as one JSON array (one call into
 * the encoder instead of one per job); hr_plain_pack cuts the array into its
 * elements and packs the frame, so no per-job bytes object is made.
 */
#ifndef HR_PLAIN_H
#define HR_PLAIN_H

#include <stdint.h>

#define HR_PLAIN_MAGIC 0x31425248u /* "HRB1" */
#define HR_PLAIN_HEAD 16u
#define HR_PLAIN_ITEM 52u
#define HR_FRAME_HEAD 4u
/* Bytes the answer to one job takes, with room to spare (protocol.answer_room(1)). */
#define HR_ANSWER_ONE 277u

/* Pack into `out` (`cap` bytes) one frame of `n` jobs named `name` with ids
 * first_id.., priorities prios[k], the shared created, limits and serializer,
 * and as bodies the elements of `json`, a JSON array as the encoder writes it
 * (ASCII, no whitespace).  Returns the bytes written; HR_E_INVALID if `json`
 * is not an array of exactly `n` elements or an element is longer than
 * `max_body`; HR_E_FULL if `cap` is too small. */
int64_t hr_plain_pack(char *out, uint64_t cap, uint32_t mode, const char *name, uint32_t name_len, uint64_t first_id,
                      int64_t created, int64_t backoff, int64_t timeout_ms, int32_t max_attempts, uint8_t ser,
                      const uint8_t *prios, uint32_t n, const char *json, uint64_t json_len, uint32_t max_body);

/* Send a plain request of one job (the one-by-one submit): hand out its
 * id, then write, publish and wake the writer as hr_req_send does; out[0]
 * is the record's position, out[1] the id.  HR_E_FULL while the request
 * area is full. */
int hr_plain_send(void *mem, uint32_t mode, const char *name, uint32_t name_len, const char *body, uint32_t body_len,
                  uint8_t prio, uint8_t ser, int64_t run_at, int64_t created, int32_t max_attempts, int64_t timeout_ms,
                  int64_t backoff, uint32_t pid, uint64_t *out);
/* Wait as hr_req_await does; once answered, one job's answer goes to out
 * (kind, id, other id) and the record is DONE.  HR_E_BUSY for any other
 * answer (an error): the record stays ANSWERED for the caller to read. */
int hr_plain_await(void *mem, uint64_t pos, int64_t timeout_us, int64_t *out);
/* hr_plain_send, then hr_plain_await for up to `timeout_us`, in one call
 * (the one-by-one submit's usual path).  out[0] is 1 once the request is
 * sent, and then out[1] is its position and out[2] its id, and the return
 * is hr_plain_await's, with the answer in out[3..5]; while out[0] is 0, the
 * return is hr_plain_send's (HR_E_FULL: the area is full, nothing sent). */
int hr_plain_submit(void *mem, uint32_t mode, const char *name, uint32_t name_len, const char *body, uint32_t body_len,
                    uint8_t prio, uint8_t ser, int64_t run_at, int64_t created, int32_t max_attempts, int64_t timeout_ms,
                    int64_t backoff, uint32_t pid, int64_t timeout_us, int64_t *out);

#endif
