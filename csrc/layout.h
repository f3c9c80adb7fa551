/* Shared-memory layout: the header, the slot record, the request record and
 * the entry types.
 *
 * Python owns the mapping.  C only ever sees a `void *` and a size, and
 * every offset below is relative to the start of that mapping, so the same
 * segment can be mapped at different addresses in different processes.
 */
#ifndef HR_LAYOUT_H
#define HR_LAYOUT_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

#define HR_MAGIC 0x4543415244414548ULL /* "HEADRACE", little-endian */
#define HR_LAYOUT_VERSION 5u
#define HR_MAX_CAPACITY (1u << 26)     /* 67M slots; keeps every size in range */
#define HR_NONE 0xFFFFFFFFu            /* "no slot" / "no position" */
#define HR_REQ_MIN (1u << 12)          /* request area bounds, a power of two */
#define HR_REQ_MAX (1u << 30)

/* Task states.  FREE marks an unused slot.  >= HR_COMPLETED is terminal. */
enum hr_state {
    HR_FREE = 0,
    HR_PENDING = 1,
    HR_DELAYED = 2,
    HR_WAITING = 3,
    HR_RUNNING = 4,
    HR_COMPLETED = 5,
    HR_DEAD = 6,
    HR_CANCELLED = 7,
    HR_NSTATES = 8,
};
#define HR_TERMINAL(s) ((s) >= HR_COMPLETED)

/* Retry backoff kinds (slot bo_kind); the delay after failed attempt n is
 * constant: base; linear: base * n; exponential: base * 2^(n-1); each
 * capped by bo_cap_ms when set.  JITTER draws uniformly from [0, delay]. */
enum hr_backoff {
    HR_BO_NONE = 0,
    HR_BO_CONSTANT = 1,
    HR_BO_LINEAR = 2,
    HR_BO_EXPONENTIAL = 3,
};
#define HR_BO_JITTER 0x80u

/* Slot flags. */
#define HR_F_DEDUP 0x01u  /* dedup_lo/hi hold a key registered in the dedup set */
#define HR_F_PARKED 0x02u /* pending, waiting in its full group's parked list */

/* Group slots: index 0 is "no group". */
#define HR_MAX_GROUPS 16384u

/* A group: its concurrency limit (0 = none), how many of its tasks run, its
 * parked list (see group.h), and how many slots its tasks hold (any state:
 * the writer keeps a limited group's backlog beyond its share on disk). */
typedef struct hr_group {
    uint32_t limit;
    uint32_t running;
    uint32_t head;
    uint32_t tail;
    uint32_t parked;
    uint32_t members;
    uint32_t _pad[2];
} hr_group;

/* A slot's links in its group's parked list. */
typedef struct hr_glink {
    uint32_t next;
    uint32_t prev;
} hr_glink;

/* Event words that waiters block on (futex on Linux). */
enum hr_event_id {
    HR_EV_PENDING = 0, /* bumped when tasks become claimable */
    HR_EV_COMMIT = 1,  /* bumped by the writer after a commit */
    HR_EV_WRITER = 2,  /* bumped when the writer has work (ring, requests) */
    HR_EV_FINISH = 3,  /* bumped when tasks reach a terminal state */
    HR_NEVENTS = 4,
};

/* One live task.  The slot table is the single source of truth inside the
 * segment: the heaps, the dedup set, the id index, the free list, the
 * position array and the dirty ring are all derived from it and are rebuilt
 * from it after a lock holder dies. */
typedef struct hr_slot {
    uint64_t id;          /* task id, 0 while free */
    uint64_t seq;         /* FIFO sequence within a priority */
    int64_t run_at;       /* us since the epoch; key of the delay heap */
    int64_t lease_until;  /* us since the epoch; key of the lease heap */
    int64_t deadline;     /* us since the epoch: the running attempt's deadline, 0 = none */
    uint64_t dedup_lo;    /* 128-bit hash of (queue, dedup key) */
    uint64_t dedup_hi;
    uint64_t aux;         /* the job cache's record of this task: its position + 1, 0 = none */
    uint32_t attempt;     /* claims so far; the fencing token */
    uint32_t max_attempts;/* claims allowed before the task is dead; 0 = no limit */
    uint32_t group;       /* group index, 0 = none */
    uint32_t version;     /* bumped on every change that must reach disk */
    uint32_t timeout_ms;  /* per-attempt processing time limit, 0 = none */
    uint32_t progress;    /* the running attempt's reported progress, in millionths */
    uint32_t bo_base_ms;  /* retry backoff: base (constant, linear step, exponential base) */
    uint32_t bo_cap_ms;   /* retry backoff: cap, 0 = none */
    uint8_t state;
    uint8_t prio;         /* 0..255, higher runs first */
    uint8_t dirty;        /* 1 while the slot sits in the dirty ring */
    uint8_t flags;
    uint8_t bo_kind;      /* HR_BO_* | HR_BO_JITTER */
    uint8_t _pad[3];
} hr_slot;

/* A heap entry keeps its key inline: comparing through the slot table
 * costs a cache miss per comparison at large sizes. */
typedef struct hr_hent {
    uint64_t key;
    uint32_t slot;
    uint32_t _pad;
} hr_hent;

/* An open-addressing bucket: a 128-bit key and slot + 1 (0 = empty). */
typedef struct hr_bucket {
    uint64_t lo;
    uint64_t hi;
    uint32_t slot1;
    uint32_t _pad;
} hr_bucket;

/* A dirty-ring entry and the slot version a consumer saw when it peeked. */
typedef struct hr_rent {
    uint32_t slot;
    uint32_t seen;
} hr_rent;

/* Most waiters that spin at once, whatever the number of cores. */
#define HR_SPIN_TOKENS 4

typedef struct hr_event {
    uint32_t value;
    uint32_t waiters;     /* asleep on the futex */
    int64_t spin_until;   /* its spinner gives up then (us, monotonic); at most one spins */
    uint8_t _pad[48];     /* one cache line each */
} hr_event;

/* Counters kept for stats and tests; none is needed for correctness. */
typedef struct hr_counters {
    uint64_t repairs;       /* EOWNERDEAD repairs performed */
    uint64_t fenced;        /* stale completions / heartbeats ignored */
    uint64_t claimed;
    uint64_t finished;
    uint64_t inserted;
    uint64_t expired;
    uint64_t evicted;
    uint64_t lock_spins_won;  /* acquisitions that succeeded while spinning */
    uint64_t lock_sleeps;     /* acquisitions that had to block */
    uint64_t flush_seq;       /* the writer's last flush whose slots are freed (see stats) */
} hr_counters;

typedef struct hr_header {
    /* Immutable after init; covered by `checksum`. */
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t total_size;
    uint64_t generation;
    uint32_t capacity;
    uint32_t creator_uid;
    uint32_t buckets;      /* dedup / id-index buckets, a power of two */
    uint32_t slot_size;    /* sizeof(hr_slot): catches ABI drift */
    uint64_t off_slots;
    uint64_t off_ready;
    uint64_t off_delay;
    uint64_t off_lease;
    uint64_t off_dedup;
    uint64_t off_ids;
    uint64_t off_ring;
    uint64_t off_pos;      /* u32 per slot: heap position, or free-list next */
    uint64_t off_req;      /* the request area, last in the mapping */
    uint64_t req_cap;      /* its bytes, a power of two */
    uint64_t off_jc;       /* the job cache (jobcache.h), after the request area */
    uint64_t jc_cap;       /* its bytes */
    uint64_t checksum;

    /* The one process-shared robust mutex. */
    pthread_mutex_t lock __attribute__((aligned(64)));

    /* Mutable state, guarded by `lock`. */
    uint64_t next_seq __attribute__((aligned(64)));
    uint64_t next_id;      /* next task id to hand out */
    uint64_t req_tail;     /* where the next request record goes; release-stored */
    uint32_t free_head;
    uint32_t nfree;
    uint32_t ready_n;
    uint32_t delay_n;
    uint32_t lease_n;
    uint32_t dedup_n;
    uint32_t ids_n;
    uint32_t ring_epoch;   /* bumped when the ring is rebuilt */
    uint32_t ring_head;    /* index of the oldest entry */
    uint32_t ring_len;     /* entries in the ring, <= capacity */
    uint32_t poisoned;     /* repair found a slot it cannot trust */
    uint32_t _pad1;
    uint32_t count[HR_NSTATES];
    /* Undo journal: a slot is copied here before it is changed, so a
     * holder killed half-way through a slot write is rolled back. */
    uint32_t undo_idx;
    uint32_t _pad0;
    hr_slot undo;
    hr_counters stats;

    /* Oldest unreclaimed request record.  Written by the one consumer,
     * without the lock (release); producers read it with acquire. */
    uint64_t req_head __attribute__((aligned(64)));
    /* Spin tokens (see hr_wait): each holds the time (us, monotonic) its
     * spinner gives up, 0 when free.  They sit in what was padding, so a
     * segment made before them reads as all free. */
    int64_t spin_tokens[HR_SPIN_TOKENS];
    /* The job cache's next position: written by the writer alone. */
    uint64_t jc_head;

    hr_event events[HR_NEVENTS] __attribute__((aligned(64)));
} hr_header;

/* A request record in the request area: many producers, one consumer.
 * Positions are monotonic byte counts; a record sits at pos & (req_cap - 1),
 * never crosses the end of the area (a PAD record fills the gap instead) and
 * is a multiple of 32 bytes long.  Its data follows the header. */
typedef struct hr_req {
    uint32_t len;     /* total record bytes including this header, a multiple of 32 */
    uint32_t state;   /* HR_REQ_*; changed with atomic release stores */
    uint32_t pid;     /* the producer's pid */
    uint32_t nbytes;  /* data bytes: the request, later the response */
    uint64_t pos;     /* this record's own position */
    uint64_t tag;     /* while RESERVED: data bytes a streaming producer has written so far
                       * (hr_req_stream); 0 on reserve and for a request written whole */
} hr_req;

/* A producer reserves (RESERVED), writes and publishes (READY); the consumer
 * answers (ANSWERED); the producer reads the answer (DONE) or gives up
 * (ABANDONED).  DONE, PAD and ABANDONED records are reclaimable. */
enum hr_req_state {
    HR_REQ_RESERVED = 1,
    HR_REQ_READY = 2,
    HR_REQ_ANSWERED = 3,
    HR_REQ_DONE = 4,
    HR_REQ_PAD = 5,
    HR_REQ_ABANDONED = 6,
};

/* What a claim hands out: enough to fence a later complete or fail. */
typedef struct hr_ticket {
    uint64_t id;
    uint32_t slot;
    uint32_t attempt;
} hr_ticket;

/* What the writer (or a test) inserts. */
typedef struct hr_task {
    uint64_t id;
    uint64_t seq;         /* 0 = take the next from the segment */
    int64_t run_at;
    uint64_t dedup_lo;
    uint64_t dedup_hi;
    uint64_t aux;
    uint32_t group;
    uint32_t attempt;
    uint32_t max_attempts;/* 0 = no limit */
    uint32_t timeout_ms;  /* 0 = no processing deadline */
    uint32_t bo_base_ms;
    uint32_t bo_cap_ms;
    uint8_t prio;
    uint8_t state;        /* HR_PENDING, HR_DELAYED or HR_WAITING */
    uint8_t flags;        /* HR_F_DEDUP */
    uint8_t bo_kind;      /* HR_BO_* | HR_BO_JITTER */
    uint8_t _pad[4];
} hr_task;

/* A dirty-ring snapshot handed to the flusher. */
typedef struct hr_dirty {
    uint32_t slot;
    uint32_t _pad;
    hr_slot rec;
} hr_dirty;

/* A snapshot of the header counters. */
typedef struct hr_info {
    uint64_t generation;
    uint32_t capacity;
    uint32_t nfree;
    uint32_t count[HR_NSTATES];
    uint32_t ring_size;
    uint32_t ring_epoch;
    uint64_t next_seq;
    uint64_t next_id;
    uint64_t req_head;
    uint64_t req_tail;
    uint64_t req_cap;
    int64_t next_run_at;   /* the earliest delayed task's run-at, 0 if none */
    hr_counters stats;
} hr_info;

#endif
