/* The writer's turn for plain submits (see turn.h).  Built without
 * SQLite's headers (HR_HAVE_SQLITE unset), hr_turn_open says HR_E_NOT_READY
 * and every turn runs in Python. */
#include <stdlib.h>
#include <string.h>
#include "headrace.h"

#ifndef HR_HAVE_SQLITE

int hr_turn_open(uintptr_t db, const char *task_sql, const char *payload_sql, const char *event_sql,
                 const char *horizon_sql, int64_t event_delay_us, hr_turn **out)
{
    (void)db, (void)task_sql, (void)payload_sql, (void)event_sql, (void)horizon_sql, (void)event_delay_us, (void)out;
    return HR_E_NOT_READY;
}

int hr_turn_events(void *mem, hr_turn *t, int force, hr_turn_out *out)
{
    (void)mem, (void)t, (void)force, (void)out;
    return HR_E_NOT_READY;
}

int hr_turn_defs(hr_turn *t, uint32_t n, const char *const *names, const int64_t *limits)
{
    (void)t, (void)n, (void)names, (void)limits;
    return HR_E_NOT_READY;
}

void hr_turn_close(hr_turn *t)
{
    (void)t;
}

uint32_t hr_turn_wal_frames(const hr_turn *t)
{
    (void)t;
    return 0;
}

int hr_turn_cache(void *mem, hr_turn *t, const char *job_sql, hr_task *tasks, uint32_t n)
{
    (void)mem, (void)t, (void)job_sql, (void)tasks, (void)n;
    return HR_E_NOT_READY;
}

int hr_turn_run(void *mem, hr_turn *t, uint64_t scan, uint64_t replay_before, uint32_t chunk, int flush_due,
                int64_t now, hr_turn_out *out)
{
    (void)mem, (void)t, (void)scan, (void)replay_before, (void)chunk, (void)flush_due, (void)now, (void)out;
    return HR_E_NOT_READY;
}

int hr_turn_loop(void *mem, hr_turn *t, uint64_t scan, uint64_t replay_before, uint32_t chunk, int64_t flush_in_us,
                 int64_t wait_us, uint32_t wal_limit, hr_turn_out *out)
{
    (void)mem, (void)t, (void)scan, (void)replay_before, (void)chunk, (void)flush_in_us, (void)wait_us,
        (void)wal_limit, (void)out;
    return HR_E_NOT_READY;
}

int hr_turn_part(void *mem, hr_turn *t, uint64_t pos, uint32_t from, uint32_t to, hr_turn_out *out)
{
    (void)mem, (void)t, (void)pos, (void)from, (void)to, (void)out;
    return HR_E_NOT_READY;
}

int hr_turn_part_log(hr_turn *t, hr_turn_out *out)
{
    (void)t, (void)out;
    return HR_E_NOT_READY;
}

int hr_turn_part_place(void *mem, hr_turn *t, uint64_t pos, int64_t now, hr_turn_out *out)
{
    (void)mem, (void)t, (void)pos, (void)now, (void)out;
    return HR_E_NOT_READY;
}

#else

#include <errno.h>
#include <signal.h>
#include <sqlite3ext.h>
#include <time.h>
SQLITE_EXTENSION_INIT1

#define EV_SUBMITTED 1
#define EV_BATCH_SUBMITTED 2

typedef struct hr_def {
    char *name;
    uint32_t len;
    uint32_t max_attempts;
    int64_t timeout_ms;
    int64_t backoff;
} hr_def;

/* One job of a request, pointing into the request area. */
typedef struct item {
    uint64_t id, seq;
    int64_t run_at, created, backoff, timeout_ms;
    int32_t max_attempts;
    uint32_t name_len, body_len;
    uint8_t prio, ser;
    const char *name, *body;
} item;

typedef struct rec {
    uint64_t pos;
    uint32_t first, n; /* its items: items[first .. first + n) */
} rec;

/* The submit event of a one-job request, not yet written (see hold_event). */
typedef struct held_event {
    uint64_t id;
    int64_t at;
} held_event;

/* Most held events: a turn that holds more writes them all. */
#define HELD_MAX 1024

struct hr_turn {
    sqlite3 *db;
    sqlite3_stmt *begin, *commit, *rollback, *task, *payload, *event, *horizon;
    sqlite3_stmt *job; /* hr_turn_cache's read, prepared on first use */
    hr_def *defs;
    uint32_t ndefs;
    item *items;
    hr_task *tasks;
    int32_t *status;
    uint32_t icap;
    rec *recs;
    uint32_t rcap;
    char *answer;
    uint32_t acap;
    uint32_t sn; /* jobs of the request being streamed, inserted so far (hr_turn_part) */
    uint32_t wal_frames; /* frames in the WAL after the connection's last commit (its WAL hook) */
    held_event *held;    /* one-job submits' events, committed tasks whose event is not written yet */
    uint32_t nheld, hcap;
    int64_t held_since;  /* hr_mono_us() when the oldest was held */
    int64_t delay_us;    /* how long an event may be held */
};

/* The entry point SQLite calls when the store loads this module as an
 * extension: it hands over the API table of the library the store uses. */
__attribute__((visibility("default"))) int sqlite3_headrace_init(sqlite3 *db, char **err,
                                                                  const sqlite3_api_routines *api)
{
    (void)db;
    (void)err;
    SQLITE_EXTENSION_INIT2(api);
    return SQLITE_OK;
}

static void finalize(hr_turn *t)
{
    sqlite3_stmt **all[] = {&t->begin, &t->commit, &t->rollback, &t->task, &t->payload, &t->event, &t->horizon,
                            &t->job};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++) {
        if (*all[k])
            sqlite3_finalize(*all[k]);
        *all[k] = NULL;
    }
}

static void free_defs(hr_turn *t)
{
    for (uint32_t k = 0; k < t->ndefs; k++)
        free(t->defs[k].name);
    free(t->defs);
    t->defs = NULL;
    t->ndefs = 0;
}

/* Every commit on the connection, whoever made it, reports the WAL's size
 * here (autocheckpoint is off, so the hook is free for this). */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
    (void)db;
    (void)name;
    ((hr_turn *)arg)->wal_frames = frames > 0 ? (uint32_t)frames : 0;
    return SQLITE_OK;
}

uint32_t hr_turn_wal_frames(const hr_turn *t)
{
    return t->wal_frames;
}

void hr_turn_close(hr_turn *t)
{
    if (!t)
        return;
    if (sqlite3_api && t->db)
        sqlite3_wal_hook(t->db, NULL, NULL);
    if (sqlite3_api)
        finalize(t);
    free_defs(t);
    free(t->items);
    free(t->tasks);
    free(t->status);
    free(t->recs);
    free(t->answer);
    free(t->held);
    free(t);
}

int hr_turn_open(uintptr_t db, const char *task_sql, const char *payload_sql, const char *event_sql,
                 const char *horizon_sql, int64_t event_delay_us, hr_turn **out)
{
    if (!sqlite3_api)
        return HR_E_NOT_READY; /* the store has not loaded the extension */
    if (!db)
        return HR_E_INVALID;
    hr_turn *t = calloc(1, sizeof *t);
    if (!t)
        return HR_E_FULL;
    t->db = (sqlite3 *)db;
    t->delay_us = event_delay_us < 0 ? 0 : event_delay_us;
    const char *sql[] = {"BEGIN", "COMMIT", "ROLLBACK", task_sql, payload_sql, event_sql, horizon_sql};
    sqlite3_stmt **st[] = {&t->begin, &t->commit, &t->rollback, &t->task, &t->payload, &t->event, &t->horizon};
    for (size_t k = 0; k < sizeof sql / sizeof *sql; k++) {
        if (sqlite3_prepare_v2(t->db, sql[k], -1, st[k], NULL) != SQLITE_OK) {
            hr_turn_close(t);
            return HR_E_INVALID;
        }
    }
    sqlite3_wal_hook(t->db, wal_hook, t);
    *out = t;
    return HR_OK;
}

int hr_turn_defs(hr_turn *t, uint32_t n, const char *const *names, const int64_t *limits)
{
    hr_def *d = n ? calloc(n, sizeof *d) : NULL;
    if (n && !d)
        return HR_E_FULL;
    for (uint32_t k = 0; k < n; k++) {
        size_t len = strlen(names[k]);
        d[k] = (hr_def){malloc(len + 1), (uint32_t)len, (uint32_t)limits[3 * k], limits[3 * k + 1], limits[3 * k + 2]};
        if (!d[k].name) {
            for (uint32_t j = 0; j < k; j++)
                free(d[j].name);
            free(d);
            return HR_E_FULL;
        }
        memcpy(d[k].name, names[k], len + 1);
    }
    free_defs(t);
    t->defs = d;
    t->ndefs = n;
    return HR_OK;
}

static int grow(void **p, uint32_t *cap, uint32_t need, size_t size)
{
    if (need <= *cap)
        return 1;
    uint32_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, (size_t)c * size);
    if (!q)
        return 0;
    *p = q;
    *cap = c;
    return 1;
}

static int grow_items(hr_turn *t, uint32_t need)
{
    uint32_t c = t->icap, c2 = t->icap, c3 = t->icap;
    /* The three arrays grow alike; one that failed is grown again next time. */
    if (!grow((void **)&t->items, &c, need, sizeof *t->items) ||
        !grow((void **)&t->tasks, &c2, need, sizeof *t->tasks) ||
        !grow((void **)&t->status, &c3, need, sizeof *t->status))
        return 0;
    t->icap = c;
    return 1;
}

static inline uint64_t rd64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t rd32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The limits of a job whose submitter did not know its definition
 * (timeout_ms < 0), as Writer._defined fills them: from the registered
 * definition (0 where there is none: the claiming worker's applies), the
 * attempt limit only where the job has none of its own (0). */
static void resolve(const hr_turn *t, item *it)
{
    if (it->timeout_ms >= 0)
        return;
    const hr_def *d = NULL;
    for (uint32_t k = 0; k < t->ndefs; k++) {
        if (t->defs[k].len == it->name_len && !memcmp(t->defs[k].name, it->name, it->name_len)) {
            d = &t->defs[k];
            break;
        }
    }
    if (!it->max_attempts)
        it->max_attempts = d ? (int32_t)d->max_attempts : 0;
    it->timeout_ms = d ? d->timeout_ms : 0;
    it->backoff = d ? d->backoff : 0;
}

/* Parse a plain request's `nbytes` at `data` into items[at ..]; the count,
 * or -1 if it is not a plain request this turn can take. */
static int64_t parse(hr_turn *t, const char *data, uint32_t nbytes, uint32_t at)
{
    if (nbytes < HR_PLAIN_HEAD || rd32(data) != HR_PLAIN_MAGIC || rd32(data + 4) > 2 || rd32(data + 12))
        return -1; /* marshal, or another mode (replay, reports, commands) */
    uint32_t n = rd32(data + 8);
    if (n == 0 || n > (nbytes - HR_PLAIN_HEAD) / HR_PLAIN_ITEM || !grow_items(t, at + n))
        return -1;
    const char *p = data + HR_PLAIN_HEAD, *end = data + nbytes;
    for (uint32_t k = 0; k < n; k++) {
        if ((uint64_t)(end - p) < HR_PLAIN_ITEM)
            return -1;
        item *it = &t->items[at + k];
        it->id = rd64(p);
        it->run_at = (int64_t)rd64(p + 8);
        it->created = (int64_t)rd64(p + 16);
        it->backoff = (int64_t)rd64(p + 24);
        it->timeout_ms = (int64_t)rd64(p + 32);
        it->max_attempts = (int32_t)rd32(p + 40);
        uint16_t name_len;
        memcpy(&name_len, p + 44, 2);
        it->name_len = name_len;
        it->prio = (uint8_t)p[46];
        it->ser = (uint8_t)p[47];
        it->body_len = rd32(p + 48);
        p += HR_PLAIN_ITEM;
        if (it->id == 0 || it->name_len == 0 || it->max_attempts < 0 || it->timeout_ms > UINT32_MAX ||
            (uint64_t)(end - p) < (uint64_t)it->name_len + it->body_len)
            return -1;
        it->name = p;
        it->body = p + it->name_len;
        p += it->name_len + it->body_len;
        resolve(t, it);
    }
    return p == end ? (int64_t)n : -1;
}

/* Parse the whole frames of a request sent in parts (each a length, then a
 * plain request of one mode) into items[at ..]; the count, or -1 if they are
 * not all plain requests of one mode, or do not end on a whole frame. */
static int64_t parse_frames(hr_turn *t, const char *data, uint64_t nbytes, uint32_t at)
{
    const char *p = data, *end = data + nbytes;
    uint32_t n = 0, mode = 0;
    while (p < end) {
        if ((uint64_t)(end - p) < HR_FRAME_HEAD + HR_PLAIN_HEAD)
            return -1;
        uint32_t len = rd32(p);
        if ((uint64_t)(end - p) - HR_FRAME_HEAD < len || len < HR_PLAIN_HEAD ||
            (n && rd32(p + HR_FRAME_HEAD + 4) != mode))
            return -1;
        mode = rd32(p + HR_FRAME_HEAD + 4);
        int64_t k = parse(t, p + HR_FRAME_HEAD, len, at + n);
        if (k < 0)
            return -1;
        n += (uint32_t)k;
        p += HR_FRAME_HEAD + len;
    }
    return n ? (int64_t)n : -1;
}

static int step_done(sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static int insert_event(hr_turn *t, int kind, uint64_t id, uint32_t n, int64_t at)
{
    sqlite3_bind_int(t->event, 1, kind);
    sqlite3_bind_int64(t->event, 2, (sqlite3_int64)id);
    sqlite3_bind_int64(t->event, 3, n);
    sqlite3_bind_int64(t->event, 4, at);
    return step_done(t->event);
}

/* The event rows of a request's `n` jobs from `it`, one per run of
 * consecutive ids: a streamed request's parts take their ids one part at a
 * time, so another producer's may come between. */
static int store_event(hr_turn *t, const item *it, uint32_t n)
{
    int kind = n == 1 ? EV_SUBMITTED : EV_BATCH_SUBMITTED, rc = SQLITE_OK;
    for (uint32_t k = 0, run; k < n && rc == SQLITE_OK; k += run) {
        for (run = 1; k + run < n && it[k + run].id == it[k].id + run; run++)
            ;
        rc = insert_event(t, kind, it[k].id, run, it[k].created);
    }
    return rc;
}

/* Hold the submit event of a one-job request, to write it with others: a
 * commit of one-by-one submits then writes the tasks' and payloads' pages
 * only, not the events' too (a third of the WAL frames a commit writes).
 * 0 if it cannot be held (holding is off, or no memory): write it now. */
static int hold_event(hr_turn *t, const item *it, int64_t mono)
{
    if (!t->delay_us || !grow((void **)&t->held, &t->hcap, t->nheld + 1, sizeof *t->held))
        return 0;
    if (!t->nheld)
        t->held_since = mono;
    t->held[t->nheld++] = (held_event){it->id, it->created};
    return 1;
}

/* Inside the caller's transaction: the held events (they stay held until
 * the commit). */
static int write_held(hr_turn *t)
{
    int rc = SQLITE_OK;
    for (uint32_t k = 0; k < t->nheld && rc == SQLITE_OK; k++)
        rc = insert_event(t, EV_SUBMITTED, t->held[k].id, 1, t->held[k].at);
    return rc;
}

/* Inside the caller's transaction, once nothing is held: the horizon, the
 * segment's next FIFO sequence (every committed task below it has its
 * submit event written; after a crash, the store writes the events of the
 * tasks from there that have none). */
static int write_horizon(void *mem, hr_turn *t)
{
    uint64_t next;
    if (hr_reserve_seq(mem, 0, &next) != HR_OK)
        return SQLITE_ERROR;
    sqlite3_bind_int64(t->horizon, 1, (sqlite3_int64)next);
    return step_done(t->horizon);
}

static int held_due(const hr_turn *t, int64_t mono)
{
    return t->nheld && (t->nheld >= HELD_MAX || mono - t->held_since >= t->delay_us);
}

/* The task and payload rows of `n` jobs from `it`. */
static int store_items(hr_turn *t, const item *it, uint32_t n)
{
    int rc = SQLITE_OK;
    for (uint32_t k = 0; k < n && rc == SQLITE_OK; k++, it++) {
        sqlite3_stmt *s = t->task;
        sqlite3_bind_int64(s, 1, (sqlite3_int64)it->id);
        sqlite3_bind_text(s, 2, it->name, (int)it->name_len, SQLITE_STATIC);
        sqlite3_bind_int(s, 3, it->prio);
        sqlite3_bind_int64(s, 4, (sqlite3_int64)it->seq);
        sqlite3_bind_int64(s, 5, it->created);
        sqlite3_bind_int64(s, 6, it->run_at);
        sqlite3_bind_null(s, 7);
        sqlite3_bind_null(s, 8);
        sqlite3_bind_int64(s, 9, it->max_attempts);
        sqlite3_bind_int(s, 10, it->ser);
        sqlite3_bind_int64(s, 11, it->timeout_ms);
        sqlite3_bind_int64(s, 12, it->backoff);
        rc = step_done(s);
        if (rc == SQLITE_OK) {
            sqlite3_bind_int64(t->payload, 1, (sqlite3_int64)it->id);
            sqlite3_bind_blob(t->payload, 2, it->body, (int)it->body_len, SQLITE_STATIC);
            rc = step_done(t->payload);
        }
    }
    sqlite3_clear_bindings(t->task);
    sqlite3_clear_bindings(t->payload); /* the bodies live in the request area */
    return rc;
}

/* BEGIN, the events, tasks and payloads of the taken requests, COMMIT.
 * One-job requests' events are held (hold_event) until they are
 * `delay_us` old, or many, or another event is written anyway; then the
 * held ones go first, so that the log keeps the order of the commits. */
static int store(void *mem, hr_turn *t, uint32_t nrec)
{
    uint32_t held_before = t->nheld;
    int64_t mono = hr_mono_us();
    int flush = held_due(t, mono) || !t->delay_us;
    for (uint32_t r = 0; r < nrec && !flush; r++)
        flush = t->recs[r].n != 1;
    int had = flush && t->nheld; /* only then does the horizon move */
    int rc = step_done(t->begin);
    if (rc == SQLITE_OK && had)
        rc = write_held(t);
    for (uint32_t r = 0; r < nrec && rc == SQLITE_OK; r++) {
        const item *it = &t->items[t->recs[r].first];
        uint32_t n = t->recs[r].n;
        if (flush || !hold_event(t, it, mono))
            rc = store_event(t, it, n);
        if (rc == SQLITE_OK)
            rc = store_items(t, it, n);
    }
    if (rc == SQLITE_OK && had)
        rc = write_horizon(mem, t);
    if (rc == SQLITE_OK) {
        HR_FAULT(HR_FS_TURN_COMMIT);
        rc = step_done(t->commit);
    }
    if (rc != SQLITE_OK) {
        if (!sqlite3_get_autocommit(t->db))
            step_done(t->rollback);
        t->nheld = held_before; /* this turn's tasks are not in */
        return rc;
    }
    if (flush)
        t->nheld = 0;
    return SQLITE_OK;
}

/* Write the held events in a transaction of their own (see turn.h). */
static int commit_held(void *mem, hr_turn *t)
{
    int rc = step_done(t->begin);
    if (rc == SQLITE_OK)
        rc = write_held(t);
    if (rc == SQLITE_OK)
        rc = write_horizon(mem, t);
    if (rc == SQLITE_OK)
        rc = step_done(t->commit);
    if (rc != SQLITE_OK) {
        if (!sqlite3_get_autocommit(t->db))
            step_done(t->rollback);
        return rc;
    }
    t->nheld = 0;
    return SQLITE_OK;
}

int hr_turn_events(void *mem, hr_turn *t, int force, hr_turn_out *out)
{
    memset(out, 0, sizeof *out);
    uint32_t n = t->nheld;
    /* Inside a transaction (a streamed request's), they wait for the next call. */
    if (!n || (!force && !held_due(t, hr_mono_us())) || !sqlite3_get_autocommit(t->db))
        return HR_OK;
    int sql = commit_held(mem, t);
    if (sql != SQLITE_OK) {
        out->sql_rc = sql;
        out->stopped = HR_TURN_OTHER;
        return HR_OK;
    }
    out->records = n;
    return HR_OK;
}

static void pack(void *mem, const hr_turn *t, uint32_t n, int64_t now)
{
    for (uint32_t k = 0; k < n; k++) {
        const item *it = &t->items[k];
        uint64_t bo = (uint64_t)it->backoff;
        t->tasks[k] = (hr_task){
            .id = it->id,
            /* Its worker reads the job from here, not from SQLite. */
            .aux = hr_jc_put(mem, it->id, it->name, it->name_len, it->body, it->body_len, it->ser, it->created,
                             it->max_attempts, (uint32_t)it->timeout_ms),
            .seq = it->seq,
            .run_at = it->run_at,
            .max_attempts = (uint32_t)it->max_attempts,
            .timeout_ms = (uint32_t)it->timeout_ms,
            .bo_base_ms = (uint32_t)((bo >> 8) & ((1u << 28) - 1)),
            .bo_cap_ms = (uint32_t)((bo >> 36) & ((1u << 28) - 1)),
            .prio = it->prio,
            .state = it->run_at > now ? HR_DELAYED : HR_PENDING,
            .bo_kind = (uint8_t)(bo & 0xFF),
        };
    }
}

/* Answer every taken request: each job inserted under its own id (the
 * layout of protocol.encode_inserted; t->answer was grown for the largest
 * during the walk, so nothing here can fail after the commit). */
static void answer(void *mem, hr_turn *t, uint32_t nrec)
{
    for (uint32_t r = 0; r < nrec; r++) {
        uint32_t n = t->recs[r].n, size = 4 + 17 * n;
        memcpy(t->answer, &n, 4);
        memset(t->answer + 4, 0, n);
        char *p = t->answer + 4 + n;
        for (uint32_t k = 0; k < n; k++, p += 16) {
            uint64_t ids[2] = {t->items[t->recs[r].first + k].id, 0};
            memcpy(p, ids, 16);
        }
        hr_req_answer(mem, t->recs[r].pos, t->answer, size); /* HR_E_STATE: its producer gave up */
    }
    hr_notify(mem, HR_EV_COMMIT);
}

int hr_turn_run(void *mem, hr_turn *t, uint64_t scan, uint64_t replay_before, uint32_t chunk, int flush_due,
                int64_t now, hr_turn_out *out)
{
    memset(out, 0, sizeof *out);
    out->scan = scan;
    t->sn = 0;
    hr_info info;
    int rc = hr_get_info(mem, &info);
    if (rc != HR_OK)
        return rc;
    if (flush_due && info.ring_size) {
        out->stopped = HR_TURN_OTHER; /* the Python turn flushes too */
        return HR_OK;
    }
    uint32_t nrec = 0, nitems = 0;
    uint64_t pos = scan;
    for (;;) {
        hr_req q;
        rc = hr_req_next(mem, pos, &q);
        if (rc == HR_E_NOT_FOUND)
            break;
        uint64_t off = 0;
        int room = rc == HR_OK ? hr_req_data(mem, q.pos, &off) : -1;
        if (rc == HR_OK && q.state == HR_REQ_RESERVED && !q.tag) {
            out->stopped = HR_TURN_RESERVED;
            out->pid = q.pid;
            break;
        }
        if (rc != HR_OK || q.state != HR_REQ_READY || q.pos < replay_before || room < 0 ||
            q.nbytes > (uint32_t)room || !grow((void **)&t->recs, &t->rcap, nrec + 1, sizeof *t->recs)) {
            out->stopped = HR_TURN_OTHER;
            break;
        }
        /* A tag: it was sent in parts, and is whole now. */
        const char *data = (const char *)mem + off;
        int64_t n = q.tag ? parse_frames(t, data, q.nbytes, nitems) : parse(t, data, q.nbytes, nitems);
        if (n < 0 || (nitems && nitems + n > chunk) || nitems + n > info.nfree) {
            out->stopped = HR_TURN_OTHER;
            break;
        }
        if (!grow((void **)&t->answer, &t->acap, 4 + 17 * (uint32_t)n, 1)) { /* before the commit, not after */
            out->stopped = HR_TURN_OTHER;
            break;
        }
        t->recs[nrec++] = (rec){q.pos, nitems, (uint32_t)n};
        nitems += (uint32_t)n;
        pos = q.pos + q.len;
    }
    if (!nrec)
        return HR_OK;
    uint64_t first_seq;
    if ((rc = hr_reserve_seq(mem, nitems, &first_seq)) != HR_OK)
        return rc;
    for (uint32_t k = 0; k < nitems; k++)
        t->items[k].seq = first_seq + k;
    int sql = store(mem, t, nrec);
    if (sql != SQLITE_OK) {
        out->sql_rc = sql;
        out->stopped = HR_TURN_OTHER;
        return HR_OK;
    }
    HR_FAULT(HR_FS_TURN_COMMITTED);
    pack(mem, t, nitems, now);
    rc = hr_insert_batch(mem, t->tasks, nitems, t->status);
    if (rc < 0)
        return rc; /* committed, not shown: the writer's repair finds them on disk */
    out->unplaced = nitems - (uint32_t)rc;
    answer(mem, t, nrec);
    out->scan = pos;
    out->items = out->last = nitems;
    out->records = nrec;
    out->tasks = t->tasks;
    out->status = t->status;
    return HR_OK;
}

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int pid_alive(uint32_t pid)
{
    return pid && (kill((pid_t)pid, 0) == 0 || errno == EPERM);
}

int hr_turn_loop(void *mem, hr_turn *t, uint64_t scan, uint64_t replay_before, uint32_t chunk, int64_t flush_in_us,
                 int64_t wait_us, uint32_t wal_limit, hr_turn_out *out)
{
    int64_t start = hr_mono_us();
    int64_t flush_at = start + flush_in_us, until = start + (wait_us < 0 ? 0 : wait_us);
    uint32_t items = 0, records = 0, turns = 0;
    hr_turn_out one;
    int rc;
    for (;;) {
        uint32_t seen = hr_event_value(mem, HR_EV_WRITER); /* before the look: no publish is missed */
        rc = hr_turn_run(mem, t, scan, replay_before, chunk, hr_mono_us() >= flush_at, wall_us(), &one);
        if (rc != HR_OK)
            break;
        if (one.items) {
            items += one.items;
            records += one.records;
            turns++;
            scan = one.scan;
            if (one.stopped == HR_TURN_OTHER)
                break;
            if (one.unplaced || t->wal_frames >= wal_limit) {
                one.stopped = HR_TURN_DUE;
                break;
            }
            continue; /* more may have come meanwhile */
        }
        if (one.stopped == HR_TURN_OTHER)
            break;
        if (one.stopped == HR_TURN_RESERVED && !pid_alive(one.pid)) {
            one.stopped = HR_TURN_OTHER; /* a dead producer's record: the Python turn abandons it */
            break;
        }
        /* Nothing to take: wait for a publish, until a flush or a delayed task is due, or `until`. */
        hr_info info;
        if ((rc = hr_get_info(mem, &info)) != HR_OK)
            break;
        int64_t now = hr_mono_us(), deadline = until;
        if (info.ring_size && flush_at < deadline)
            deadline = flush_at; /* then hr_turn_run hands the flush to Python */
        if (t->nheld) {
            /* No submit to share their write: held events go on their own
             * once due (one that fails is tried again a delay later). */
            if (held_due(t, now) && commit_held(mem, t) != SQLITE_OK)
                t->held_since = now;
            if (t->nheld && t->held_since + t->delay_us < deadline)
                deadline = t->held_since + t->delay_us;
        }
        if (info.next_run_at) {
            int64_t due = info.next_run_at - wall_us();
            if (due <= 0) {
                one.stopped = HR_TURN_DUE;
                break;
            }
            if (now + due < deadline)
                deadline = now + due;
        }
        if (now >= until) {
            one.stopped = HR_TURN_END;
            break;
        }
        if (hr_wait(mem, HR_EV_WRITER, seen, deadline > now ? deadline - now : 0) == HR_E_INTERRUPTED) {
            one.stopped = HR_TURN_END; /* a signal: the Python loop looks at its flags */
            break;
        }
    }
    out->scan = scan;
    out->items = items;
    out->records = records;
    out->turns = turns;
    out->stopped = one.stopped;
    out->pid = one.pid;
    out->sql_rc = rc == HR_OK ? one.sql_rc : 0;
    out->unplaced = rc == HR_OK && one.items ? one.unplaced : 0;
    out->last = rc == HR_OK ? one.items : 0;
    out->tasks = one.tasks;
    out->status = one.status;
    return rc;
}

/* Insert the whole frames of [from, to) of the data of the request being
 * streamed at `pos` (see turn.h). */
int hr_turn_part(void *mem, hr_turn *t, uint64_t pos, uint32_t from, uint32_t to, hr_turn_out *out)
{
    memset(out, 0, sizeof *out);
    if (from == 0)
        t->sn = 0; /* a new request, or the same one again after a rollback */
    uint64_t off = 0;
    int room = hr_req_data(mem, pos, &off);
    if (room < 0)
        return room;
    if (from > to || to > (uint32_t)room)
        return HR_E_INVALID;
    hr_info info;
    int rc = hr_get_info(mem, &info);
    if (rc != HR_OK)
        return rc;
    out->stopped = HR_TURN_OTHER; /* until the range is taken */
    uint32_t at = t->sn;
    int64_t n = from == to ? 0 : parse_frames(t, (const char *)mem + off + from, to - from, at);
    /* Room for everything that may not fail after the commit. */
    if (n < 0 || at + n > info.nfree || !grow((void **)&t->answer, &t->acap, 4 + 17 * (at + (uint32_t)n), 1) ||
        !grow((void **)&t->recs, &t->rcap, 1, sizeof *t->recs))
        goto done;
    uint64_t first_seq;
    if (n && (rc = hr_reserve_seq(mem, (uint32_t)n, &first_seq)) != HR_OK)
        return rc;
    for (uint32_t k = 0; k < (uint32_t)n; k++)
        t->items[at + k].seq = first_seq + k;
    int sql = store_items(t, &t->items[at], (uint32_t)n);
    if (sql != SQLITE_OK) {
        out->sql_rc = sql;
        goto done;
    }
    t->sn = at + (uint32_t)n;
    out->stopped = HR_TURN_END;
done:
    out->items = t->sn;
    return HR_OK;
}

int hr_turn_part_log(hr_turn *t, hr_turn_out *out)
{
    memset(out, 0, sizeof *out);
    if (!t->sn)
        return HR_E_STATE;
    out->items = t->sn;
    int sql = store_event(t, t->items, t->sn);
    if (sql != SQLITE_OK) {
        out->sql_rc = sql;
        out->stopped = HR_TURN_OTHER;
    }
    return HR_OK;
}

int hr_turn_part_place(void *mem, hr_turn *t, uint64_t pos, int64_t now, hr_turn_out *out)
{
    memset(out, 0, sizeof *out);
    uint32_t n = t->sn;
    if (!n)
        return HR_E_STATE;
    t->sn = 0;
    pack(mem, t, n, now);
    int rc = hr_insert_batch(mem, t->tasks, n, t->status);
    if (rc < 0)
        return rc; /* committed, not shown: the writer's repair finds them on disk */
    out->unplaced = n - (uint32_t)rc;
    t->recs[0] = (rec){pos, 0, n};
    answer(mem, t, 1);
    out->items = out->last = n;
    out->records = 1;
    out->tasks = t->tasks;
    out->status = t->status;
    return HR_OK;
}


int hr_turn_cache(void *mem, hr_turn *t, const char *job_sql, hr_task *tasks, uint32_t n)
{
    if (!t->job && sqlite3_prepare_v2(t->db, job_sql, -1, &t->job, NULL) != SQLITE_OK) {
        t->job = NULL;
        return HR_E_INVALID;
    }
    int cached = 0;
    /* A refill's tasks are mostly runs of consecutive ids: one range scan
     * per run, not a seek per task. */
    for (uint32_t k = 0; k < n;) {
        uint32_t end = k + 1;
        while (end < n && tasks[end].id == tasks[end - 1].id + 1)
            end++;
        sqlite3_stmt *s = t->job;
        sqlite3_bind_int64(s, 1, (sqlite3_int64)tasks[k].id);
        sqlite3_bind_int64(s, 2, (sqlite3_int64)tasks[end - 1].id);
        while (k < end && sqlite3_step(s) == SQLITE_ROW) {
            uint64_t id = (uint64_t)sqlite3_column_int64(s, 0);
            while (k < end && tasks[k].id < id)
                k++;
            if (k == end || tasks[k].id != id)
                continue;
            const char *name = (const char *)sqlite3_column_text(s, 1);
            int name_len = sqlite3_column_bytes(s, 1);
            const char *body = (const char *)sqlite3_column_blob(s, 4);
            int body_len = sqlite3_column_bytes(s, 4);
            if (name && (body || !body_len)) {
                tasks[k].aux = hr_jc_put(mem, id, name, (uint32_t)name_len, body, (uint32_t)body_len,
                                         (uint8_t)sqlite3_column_int(s, 2), sqlite3_column_int64(s, 3),
                                         sqlite3_column_int(s, 5), (uint32_t)sqlite3_column_int64(s, 6));
                cached += tasks[k].aux != 0;
            }
            k++;
        }
        sqlite3_reset(s);
        k = end;
    }
    return cached;
}

#endif /* HR_HAVE_SQLITE */
