/* The segment: layout arithmetic, init/attach validation, the robust lock
 * and the repair that runs after a lock holder died. */
#ifndef HR_SEGMENT_H
#define HR_SEGMENT_H

#include "layout.h"
#include "heap.h"
#include "hset.h"
#include "ring.h"

/* Pointers into one mapping, computed per call from the header. */
typedef struct hr_ctx {
    hr_header *h;
    hr_slot *s;
    uint32_t *pos;
    hr_heap ready, delay, lease;
    hr_hset dedup, ids;
    hr_ring ring;
    hr_group *g;   /* HR_MAX_GROUPS entries */
    hr_glink *gl;  /* one per slot */
} hr_ctx;

uint64_t hr_segment_size(uint32_t capacity, uint64_t req_bytes);
int hr_init(void *mem, uint64_t size, uint32_t capacity, uint64_t req_bytes, uint32_t uid,
            uint64_t generation);
int hr_attach(void *mem, uint64_t size, uint32_t uid);
uint64_t hr_generation(void *mem);
int hr_verify(void *mem, char *msg, uint32_t msglen);
int hr_get_info(void *mem, hr_info *out);
/* Pending tasks, read without the lock (a snapshot that may be a step
 * behind): for heuristics such as how much of the queue a worker claims. */
uint32_t hr_pending_count(void *mem);
void hr_set_lock_spin(uint32_t spins);

void hr_ctx_of(void *mem, hr_ctx *c);
int hr_lock(hr_ctx *c);
void hr_unlock(hr_ctx *c);
void hr_rebuild(hr_ctx *c);

/* Declare ctx `c` over `mem` and take the lock, returning its status on failure. */
#define LOCKED(c, mem)            \
    hr_ctx c;                     \
    hr_ctx_of((mem), &c);         \
    do {                          \
        int lrc_ = hr_lock(&c);   \
        if (lrc_ != HR_OK)        \
            return lrc_;          \
    } while (0)

static inline void hr_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
