/* The request area: many producers hand serialized requests to one consumer
 * (the writer), which answers each one in place.
 *
 * Producers reserve space under the segment lock; everything after that is
 * lock-free: the record's state word is the handshake (release stores,
 * acquire loads), and only the consumer moves the head.  A reserve writes
 * the whole record header before it advances the tail, so a holder killed
 * at any point leaves either no record or a complete one, and the robust
 * mutex repair has nothing to do here.
 *
 * Task ids are handed out from the header too (next_id), under the lock.
 */
#ifndef HR_REQRING_H
#define HR_REQRING_H

#include "layout.h"

int hr_req_reserve(void *mem, uint32_t nbytes, uint32_t pid, uint64_t *pos);
int hr_req_data(void *mem, uint64_t pos, uint64_t *off);
int hr_req_set_state(void *mem, uint64_t pos, uint32_t state);
int hr_req_cas_state(void *mem, uint64_t pos, uint32_t expect, uint32_t state);
int hr_req_set_nbytes(void *mem, uint64_t pos, uint32_t nbytes);
/* A producer that writes its request in parts says how many data bytes are
 * complete, so the consumer can start on them before the record is READY. */
int hr_req_stream(void *mem, uint64_t pos, uint32_t nbytes);
int hr_req_answer(void *mem, uint64_t pos, const char *data, uint32_t nbytes);
int hr_req_send(void *mem, const char *data, uint32_t nbytes, uint32_t room, uint32_t pid, uint64_t *pos);
/* Wait for the answer to our record at `pos`: HR_OK (its size in *nbytes),
 * HR_E_TIMEOUT, HR_E_INTERRUPTED (a signal; wait again), or HR_E_STATE. */
int hr_req_await(void *mem, uint64_t pos, int64_t timeout_us, uint32_t *nbytes);
int hr_req_get(void *mem, uint64_t pos, hr_req *out);
int hr_req_next(void *mem, uint64_t pos, hr_req *out);
int64_t hr_req_reclaim(void *mem, uint64_t upto);
int64_t hr_req_sweep(void *mem, uint64_t upto);
int hr_req_bounds(void *mem, uint64_t *head, uint64_t *tail);
int hr_reserve_ids(void *mem, uint32_t n, uint64_t *first);
int hr_raise_next_id(void *mem, uint64_t v);

/* Walks head..tail; called by hr_verify with the lock held. */
int hr_req_verify(const hr_header *h, char *msg, uint32_t msglen);

#endif
