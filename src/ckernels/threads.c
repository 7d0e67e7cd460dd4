/*
 * Two threads: the caller and one worker share a call's blocks.
 *
 * A call on `threads` = 2 splits its n elements into blocks of `block`
 * elements (a multiple of CHUNK, so every element goes through the same chunk
 * code as in one call: the results are bit for bit those of one call) and
 * the caller and a single worker thread take free blocks until none is left:
 * the caller from the front, the worker from the back, both ends held in one
 * atomic word. A thread slowed by other work on its core simply takes fewer;
 * when both run at one speed each takes the same half of the arrays call after
 * call, so a layer's backward finds the blocks its forward wrote (and the
 * caller's input) still in that core's cache. PyTorch splits its element-wise loops the same way
 * over its OpenMP threads from 32768 elements; a pool in C costs a few
 * microseconds per call where handing blocks to a Python thread cost tens.
 *
 * The worker spins for SPIN_NS after each job (a layer's backward usually
 * follows its forward within microseconds), then sleeps on a condition
 * variable. One caller at a time uses it (`busy`); a second caller, from
 * another Python thread, runs on its own thread. After fork() the child has
 * no worker: it starts a new one when it needs one.
 */
#include "ckernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#define SPIN_NS 200000L

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static struct job job;
static atomic_long posted;       /* jobs posted so far */
static atomic_long claimed;      /* the last job a thread claimed for the worker's part */
static atomic_long finished;     /* the last job the worker finished */
/* Blocks taken from the front (high 32 bits) and from the back (low 32 bits). */
static atomic_llong ends_taken;
#define FRONT_BLOCK (1LL << 32)
static atomic_int sleeping;
static atomic_flag busy = ATOMIC_FLAG_INIT;
static int worker_running;       /* guarded by `busy` */

/* Element offset `start` of an array, or NULL where the kernel does not use it. */
#define AT(p, start, size) ((p) ? (p) + (start) * (size) : NULL)

static atomic_long worker_blocks; /* blocks the worker has run, for the tests */

/* Runs free blocks of j, from the front or the back, until none is left;
 * returns how many it ran. */
static long take_blocks(const struct job *j, int from_back) {
    for (long taken = 0;; taken++) {
        long long ends = atomic_load(&ends_taken), front, back;
        do {
            front = ends >> 32, back = ends & 0xffffffffLL;
            if (front + back >= j->blocks) return taken;
        } while (!atomic_compare_exchange_weak(&ends_taken, &ends,
                                               ends + (from_back ? 1 : FRONT_BLOCK)));
        ptrdiff_t b = from_back ? j->blocks - 1 - back : front;
        if (j->task != NULL) {
            j->task(j, b);
            continue;
        }
        ptrdiff_t start = b * j->block;
        ptrdiff_t stop = start + j->block < j->n ? start + j->block : j->n;
        ptrdiff_t s = j->itemsize;
        ptrdiff_t m = j->bits ? start / 8 : start;  /* blocks are multiples of CHUNK */
        j->fn(AT(j->x, start, s), AT(j->g, start, s), AT(j->h, start, s), AT(j->m_in, m, 1),
              AT(j->out, start, s), AT(j->out2, start, s), AT(j->out3, start, s),
              AT(j->m_out, m, 1), j->params, stop - start);
    }
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void pause_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *unused) {
    (void)unused;
    long done = atomic_load(&posted);
    for (;;) {
        long deadline = now_ns() + SPIN_NS;
        for (int spins = 0; atomic_load(&posted) == done; spins++) {
            pause_cpu();
            if ((spins & 63) == 63 && now_ns() > deadline) {
                pthread_mutex_lock(&lock);
                /* sleeping is set before posted is read again: a caller that posts
                 * after this read sees sleeping and signals under the lock. */
                atomic_store(&sleeping, 1);
                while (atomic_load(&posted) == done) pthread_cond_wait(&wake, &lock);
                atomic_store(&sleeping, 0);
                pthread_mutex_unlock(&lock);
            }
        }
        done = atomic_load(&posted);
        long expected = done - 1;
        /* Claim the job unless the caller has already finished every block and
         * taken it back; then the worker must not touch `job` at all. */
        if (atomic_compare_exchange_strong(&claimed, &expected, done)) {
            atomic_fetch_add(&worker_blocks, take_blocks(&job, 1));
            atomic_store(&finished, done);
        }
    }
    return NULL;
}

static void forget_worker(void) {
    /* In a forked child the worker thread does not exist. */
    pthread_mutex_t fresh_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_wake = PTHREAD_COND_INITIALIZER;
    lock = fresh_lock;
    wake = fresh_wake;
    atomic_store(&sleeping, 0);
    /* A call in flight on another thread of the parent has no thread here:
     * its job counts as claimed and finished. */
    atomic_store(&claimed, atomic_load(&posted));
    atomic_store(&finished, atomic_load(&posted));
    atomic_flag_clear(&busy);
    worker_running = 0;
}

/* Runs j over its blocks on the caller and the worker; 0 if the worker is in
 * use or cannot be started (the caller then runs the job in one call). */
int run_on_two_threads(const struct job *j) {
    if (atomic_flag_test_and_set(&busy)) return 0;
    if (!worker_running) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) {
            atomic_flag_clear(&busy);
            return 0;
        }
        worker_running = 1;
    }
    job = *j;
    atomic_store(&ends_taken, 0);
    long mine = atomic_load(&posted) + 1;
    atomic_store(&posted, mine);
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&lock);
        pthread_cond_signal(&wake);
        pthread_mutex_unlock(&lock);
    }
    take_blocks(j, 0);
    long expected = mine - 1;
    if (!atomic_compare_exchange_strong(&claimed, &expected, mine)) {
        /* The worker claimed the job: wait until it has finished its block. */
        while (atomic_load(&finished) != mine) pause_cpu();
    }
    atomic_flag_clear(&busy);
    return 1;
}

/* Runs j's blocks without the GIL: on the caller and the worker where asked and
 * there are blocks to share, else one after the other. */
void run_tasks(struct job *j, Py_ssize_t threads) {
    Py_BEGIN_ALLOW_THREADS
    if (threads < 2 || j->blocks < 2 || j->blocks > MAX_BLOCKS || !run_on_two_threads(j))
        for (ptrdiff_t b = 0; b < j->blocks; b++) j->task(j, b);
    Py_END_ALLOW_THREADS
}

/* In a forked child the worker thread does not exist: forget it there. */
void init_threads(void) { pthread_atfork(NULL, NULL, forget_worker); }

/* worker_blocks() -> int: how many blocks the worker thread has run so far. */
PyObject *get_worker_blocks(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyLong_FromLong(atomic_load(&worker_blocks));
}

