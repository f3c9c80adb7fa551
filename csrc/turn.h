/* The writer's turn for plain submits, in C.
 *
 * Most of the writer's turns, under one-by-one or small-batch load, are
 * submits of plain jobs (no dedup key, group, dependency or tag): append
 * them to SQLite in one transaction, show them in the segment, answer them.
 * In Python that costs the writer more than SQLite does.  This module runs
 * such a turn end to end.  It reaches SQLite through the connection the
 * writer's store opened (through the API table SQLite hands a loadable
 * extension, so it is the same library the store uses), and it takes only
 * requests that it can finish: anything else stops it where it is, and the
 * Python turn goes on from there.  A failed statement rolls back and changes
 * nothing, so the Python turn meets (and handles) the same error.
 *
 * The requests it takes are plain requests (plain.h).
 *
 * A submit_batch chunk may be streamed: its producer writes it in parts
 * (frames) and the writer inserts each part
 * as it comes, in one transaction the writer holds, so that serialising
 * part k+1 overlaps storing part k.  hr_turn_part, hr_turn_part_log and
 * hr_turn_part_place do that work for plain parts; the caller opens and
 * commits the transaction, and rolls it back if any of them stops.
 */
#ifndef HR_TURN_H
#define HR_TURN_H

#include <stdint.h>
#include "layout.h"
#include "plain.h"


typedef struct hr_turn hr_turn;

enum hr_turn_stop {
    HR_TURN_END = 0,      /* every published request is taken (and no flush is due) */
    HR_TURN_OTHER = 1,    /* a request for the Python turn, a failed statement or a due flush */
    HR_TURN_RESERVED = 2, /* a request in whole (no parts yet) that its producer is still writing */
    HR_TURN_DUE = 3,      /* hr_turn_loop: Python's upkeep is due (a delayed task, a checkpoint by size,
                             or committed jobs the segment refused) */
};

typedef struct hr_turn_out {
    uint64_t scan;      /* where the next turn starts */
    uint32_t items;     /* jobs committed (0: the Python turn takes over) */
    uint32_t records;   /* requests answered */
    uint32_t turns;     /* hr_turn_loop: transactions committed */
    uint32_t stopped;   /* it stopped at a request it does not take: HR_TURN_* */
    uint32_t pid;       /* HR_TURN_RESERVED: the producer still writing it */
    int32_t sql_rc;     /* the SQLite result code of a failed statement, else 0 */
    uint32_t unplaced;  /* committed jobs the segment refused (see tasks, status) */
    uint32_t last;      /* jobs of the last turn: tasks and status hold as many */
    const hr_task *tasks; /* the last turn's tasks, and each one's insert status */
    const int32_t *status;
} hr_turn_out;

/* Statements for the tasks, payloads and events tables and for the events'
 * horizon (the store's SQL).  A one-job request's submit event is held up
 * to `event_delay_us` (0: never held), to be written with others: see
 * hr_turn_events. */
int hr_turn_open(uintptr_t db, const char *task_sql, const char *payload_sql, const char *event_sql,
                 const char *horizon_sql, int64_t event_delay_us, hr_turn **out);
/* Write the held submit events, in a transaction of their own, if they are
 * due (or, with `force`, if there are any) and no transaction is open.
 * Each write of them also sets the horizon: the FIFO sequence below which
 * every committed task has its submit event (after a crash, the store
 * writes those of the tasks from there that lack one).  A turn that commits
 * writes them too, once they are due.  out->records: events written;
 * out->sql_rc and HR_TURN_OTHER if the write failed (they stay held). */
int hr_turn_events(void *mem, hr_turn *t, int force, hr_turn_out *out);
/* The registered definitions, for jobs whose submitter left limits unset:
 * names[k] with limits[3k..3k+2] = max_attempts, timeout_ms, backoff. */
int hr_turn_defs(hr_turn *t, uint32_t n, const char *const *names, const int64_t *limits);
void hr_turn_close(hr_turn *t);
/* Frames in the WAL after the connection's last commit (a WAL hook: the
 * writer checkpoints by size as well as by time). */
uint32_t hr_turn_wal_frames(const hr_turn *t);
/* Copy the jobs of tasks[0..n), about to be placed by the Python turn (a
 * refill from the spill store, say), from the database into the job cache
 * (jobcache.h), pointing each task's aux at its copy: reads on the writer's
 * connection, a range scan per run of consecutive ids.
 * `job_sql` selects (id, name, ser, created, body, max_attempts,
 * timeout_ms) of the tasks with ids in ?1..?2, by id.  Returns the jobs
 * cached. */
int hr_turn_cache(void *mem, hr_turn *t, const char *job_sql, hr_task *tasks, uint32_t n);
int hr_turn_run(void *mem, hr_turn *t, uint64_t scan, uint64_t replay_before, uint32_t chunk, int flush_due,
                int64_t now, hr_turn_out *out);
/* Turns (hr_turn_run) one after another, waiting for publishes in between,
 * until a turn stops at something for Python (HR_TURN_OTHER: a request it
 * does not take, a failed statement, a dead producer's record, or the
 * flush of the dirty ring, due `flush_in_us` from now), Python's upkeep is
 * due (HR_TURN_DUE: a delayed task's time, `wal_limit` frames in the WAL,
 * jobs the segment refused), or `wait_us` passed (HR_TURN_END).  out: the
 * totals of every turn (items, records, turns), where the next starts, and
 * the last turn's unplaced, tasks and status.  The writer's loop stays in C
 * while submits keep coming. */
int hr_turn_loop(void *mem, hr_turn *t, uint64_t scan, uint64_t replay_before, uint32_t chunk, int64_t flush_in_us,
                 int64_t wait_us, uint32_t wal_limit, hr_turn_out *out);
/* Insert the parts in [from, to) of the data of the request at `pos`
 * (from = 0 starts the request).  out->items: its jobs inserted so far;
 * out->stopped = HR_TURN_OTHER where the range does not end on whole frames
 * of plain jobs, the segment has no room for them all, or a statement
 * failed (out->sql_rc): the caller rolls back. */
int hr_turn_part(void *mem, hr_turn *t, uint64_t pos, uint32_t from, uint32_t to, hr_turn_out *out);
/* The streamed request's submit event, before the commit (HR_TURN_OTHER and
 * out->sql_rc if the statement failed). */
int hr_turn_part_log(hr_turn *t, hr_turn_out *out);
/* After the commit: show the streamed request's jobs in the segment and
 * answer it (out->unplaced, tasks, status as for hr_turn_run). */
int hr_turn_part_place(void *mem, hr_turn *t, uint64_t pos, int64_t now, hr_turn_out *out);

#endif
