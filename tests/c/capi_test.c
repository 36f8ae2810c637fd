/*
 * capi_test.c -- drives the retrom3 C ABI end to end, linked against libretrom3.a by tests/capi.rs.
 *
 * Usage: capi_test MODEL_DIR
 *
 * Prints one record per line for tests/capi.rs to compare with the Rust API (floats as %.9g, which
 * round-trips an f32 exactly):
 *   version V
 *   text I HEX                                an input text (hex of its UTF-8 bytes)
 *   pair I QHEX PHEX                          an input (query, passage) pair
 *   layout STRUCT SIZE FIELD=OFFSET ...       struct layouts, checked against Rust's repr(C)
 *   dense TAG I DIM v...                      one dense vector
 *   sparse I LEN id:w ...                     one text's lexical weights
 *   colbert I COUNT DIM v...                  one text's ColBERT rows, flattened
 *   score I s0 s1 s2 s3 s4                    one pair's five scores
 *   bad CASE STATUS_NAME MESSAGE              one bad-input case (the message is one line)
 *   threads ok
 *   fork ok
 *   done
 * Checks that need no Rust reference (status codes of bad input, NULL outputs after failure, the
 * per-thread error message, results from several threads) are made here; any failure prints
 * "FAIL ..." to stderr and exits 1.
 */
#define _POSIX_C_SOURCE 200809L

#include "retrom3.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures = 0;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, " (last error: %s)\n", r3_last_error());                               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

/* Stop at once when a call that must succeed fails: later steps would only add noise. */
#define MUST(call)                                                                                 \
    do {                                                                                           \
        r3_status s_ = (call);                                                                     \
        if (s_ != R3_OK) {                                                                         \
            fprintf(stderr, "FAIL %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,               \
                    r3_status_name(s_), r3_last_error());                                          \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static const char* const TEXTS[] = {
    "What is BGE M3?",
    "BM25 is a bag-of-words retrieval function",
    "北京是中国的首都",
    "",
};
#define N_TEXTS (sizeof TEXTS / sizeof TEXTS[0])

static const char* const QUERIES[] = {"What is BGE M3?", "Defination of BM25", "capital of China"};
static const char* const PASSAGES[] = {
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector "
    "interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents",
    "北京是中国的首都",
};
#define N_PAIRS (sizeof QUERIES / sizeof QUERIES[0])

static void print_floats(const float* v, size_t n) {
    for (size_t k = 0; k < n; k++) printf(" %.9g", (double)v[k]);
    printf("\n");
}

static void print_hex(const char* s) {
    printf(" ");
    if (!*s) printf("-"); /* empty text: a visible token keeps the field count fixed */
    for (; *s; s++) printf("%02x", (unsigned)(unsigned char)*s);
}

static void print_inputs(void) {
    for (size_t i = 0; i < N_TEXTS; i++) {
        printf("text %zu", i);
        print_hex(TEXTS[i]);
        printf("\n");
    }
    for (size_t i = 0; i < N_PAIRS; i++) {
        printf("pair %zu", i);
        print_hex(QUERIES[i]);
        print_hex(PASSAGES[i]);
        printf("\n");
    }
}

static void print_layouts(void) {
    printf("layout r3_encode_options %zu dense=%zu sparse=%zu colbert=%zu pooling=%zu normalize=%zu "
           "max_length=%zu batch_size=%zu\n",
           sizeof(r3_encode_options), offsetof(r3_encode_options, dense),
           offsetof(r3_encode_options, sparse), offsetof(r3_encode_options, colbert),
           offsetof(r3_encode_options, pooling), offsetof(r3_encode_options, normalize),
           offsetof(r3_encode_options, max_length), offsetof(r3_encode_options, batch_size));
    printf("layout r3_score_options %zu weights=%zu max_query_length=%zu max_passage_length=%zu "
           "batch_size=%zu\n",
           sizeof(r3_score_options), offsetof(r3_score_options, weights),
           offsetof(r3_score_options, max_query_length),
           offsetof(r3_score_options, max_passage_length), offsetof(r3_score_options, batch_size));
}

/* Encode with all three heads and print everything. */
static void encode_all(const r3_model* model) {
    r3_encode_options opts;
    MUST(r3_encode_options_init(&opts));
    opts.sparse = 1;
    opts.colbert = 1;
    r3_output* out = NULL;
    MUST(r3_encode(model, TEXTS, N_TEXTS, &opts, &out));
    CHECK(strcmp(r3_last_error(), "") == 0, "success must clear the last error");

    size_t count = 0;
    MUST(r3_output_count(out, &count));
    CHECK(count == N_TEXTS, "count %zu", count);

    const float* dense = NULL;
    size_t n = 0, dim = 0;
    MUST(r3_output_dense(out, &dense, &n, &dim));
    CHECK(n == N_TEXTS && dim > 0 && dense != NULL, "dense n %zu dim %zu", n, dim);
    for (size_t i = 0; i < n; i++) {
        printf("dense all %zu %zu", i, dim);
        print_floats(dense + i * dim, dim);
    }
    for (size_t i = 0; i < count; i++) {
        const uint32_t* ids = NULL;
        const float* w = NULL;
        size_t len = 0;
        MUST(r3_output_sparse(out, i, &ids, &w, &len));
        printf("sparse %zu %zu", i, len);
        for (size_t k = 0; k < len; k++) printf(" %u:%.9g", (unsigned)ids[k], (double)w[k]);
        printf("\n");

        const float* cb = NULL;
        size_t rows = 0, cdim = 0;
        MUST(r3_output_colbert(out, i, &cb, &rows, &cdim));
        CHECK(rows > 0 && cdim > 0 && cb != NULL, "colbert %zu: %zu x %zu", i, rows, cdim);
        printf("colbert %zu %zu %zu", i, rows, cdim);
        print_floats(cb, rows * cdim);
    }
    r3_output_free(out);
}

/* Dense only, with every option away from its default. */
static void encode_options(const r3_model* model) {
    r3_encode_options opts;
    MUST(r3_encode_options_init(&opts));
    opts.pooling = R3_POOLING_MEAN;
    opts.normalize = R3_NORMALIZE_NO;
    opts.max_length = 8;
    opts.batch_size = 1;
    r3_output* out = NULL;
    MUST(r3_encode(model, TEXTS, N_TEXTS, &opts, &out));
    const float* dense = NULL;
    size_t n = 0, dim = 0;
    MUST(r3_output_dense(out, &dense, &n, &dim));
    for (size_t i = 0; i < n; i++) {
        printf("dense opts %zu %zu", i, dim);
        print_floats(dense + i * dim, dim);
    }
    r3_output_free(out);

    /* NULL options: the defaults (dense only). */
    MUST(r3_encode(model, TEXTS, 1, NULL, &out));
    MUST(r3_output_dense(out, &dense, &n, &dim));
    printf("dense null %zu %zu", (size_t)0, dim);
    print_floats(dense, dim);
    r3_output_free(out);

    /* No texts at all. */
    MUST(r3_encode(model, NULL, 0, NULL, &out));
    MUST(r3_output_dense(out, &dense, &n, &dim));
    CHECK(n == 0 && dense == NULL, "empty encode: n %zu", n);
    r3_output_free(out);
}

static void score(const r3_model* model) {
    r3_score_options opts;
    MUST(r3_score_options_init(&opts));
    opts.weights[0] = 0.4f;
    opts.weights[1] = 0.2f;
    opts.weights[2] = 0.4f;
    opts.max_passage_length = 16;
    float out5[N_PAIRS * R3_SCORE_COUNT];
    MUST(r3_score(model, QUERIES, PASSAGES, N_PAIRS, &opts, out5));
    for (size_t i = 0; i < N_PAIRS; i++) {
        printf("score %zu", i);
        print_floats(out5 + i * R3_SCORE_COUNT, R3_SCORE_COUNT);
    }
    MUST(r3_score(model, NULL, NULL, 0, NULL, NULL));
}

static void report_bad(const char* name, r3_status got, r3_status want) {
    const char* msg = r3_last_error();
    printf("bad %s %s %s\n", name, r3_status_name(got), msg);
    CHECK(got == want, "%s: got %s, want %s", name, r3_status_name(got), r3_status_name(want));
    CHECK(msg != NULL && msg[0] != '\0', "%s: empty message", name);
}

static void bad_inputs(const r3_model* model, const char* dir) {
    r3_model* m = (r3_model*)0x1; /* must be overwritten with NULL on failure */
    report_bad("load_null_dir", r3_model_load(NULL, "cpu", &m), R3_ERR_NULL_POINTER);
    CHECK(m == NULL, "out not cleared on failure");
    report_bad("load_null_out", r3_model_load(dir, "cpu", NULL), R3_ERR_NULL_POINTER);
    m = (r3_model*)0x1;
    report_bad("load_missing_dir", r3_model_load("/nonexistent/retrom3-model", NULL, &m), R3_ERR_IO);
    CHECK(m == NULL, "out not cleared on failure");
    report_bad("load_invalid_utf8", r3_model_load("tests/\xff\xfe", "cpu", &m), R3_ERR_INVALID_UTF8);
    report_bad("load_bad_device", r3_model_load(dir, "tpu", &m), R3_ERR_INVALID_ARGUMENT);
    report_bad("load_cuda_unsupported", r3_model_load(dir, "cuda:0", &m), R3_ERR_UNSUPPORTED);

    r3_output* out = (r3_output*)0x1;
    const char* const texts[] = {"fine", "bad \xc3\x28 utf-8"};
    const char* const with_null[] = {"fine", NULL};
    report_bad("encode_null_model", r3_encode(NULL, texts, 1, NULL, &out), R3_ERR_NULL_POINTER);
    CHECK(out == NULL, "out not cleared on failure");
    report_bad("encode_null_texts", r3_encode(model, NULL, 2, NULL, &out), R3_ERR_NULL_POINTER);
    report_bad("encode_null_text", r3_encode(model, with_null, 2, NULL, &out), R3_ERR_NULL_POINTER);
    report_bad("encode_null_out", r3_encode(model, texts, 1, NULL, NULL), R3_ERR_NULL_POINTER);
    report_bad("encode_invalid_utf8", r3_encode(model, texts, 2, NULL, &out), R3_ERR_INVALID_UTF8);

    r3_encode_options opts;
    MUST(r3_encode_options_init(&opts));
    opts.dense = 0;
    report_bad("encode_nothing_requested", r3_encode(model, texts, 1, &opts, &out),
               R3_ERR_INVALID_ARGUMENT);
    MUST(r3_encode_options_init(&opts));
    opts.pooling = 7;
    report_bad("encode_bad_pooling", r3_encode(model, texts, 1, &opts, &out), R3_ERR_INVALID_ARGUMENT);
    MUST(r3_encode_options_init(&opts));
    opts.max_length = 100000;
    report_bad("encode_max_length_too_big", r3_encode(model, texts, 1, &opts, &out),
               R3_ERR_INVALID_ARGUMENT);
    report_bad("options_init_null", r3_encode_options_init(NULL), R3_ERR_NULL_POINTER);

    /* Accessors on a dense-only output. */
    MUST(r3_encode(model, texts, 1, NULL, &out));
    const float* data = NULL;
    const uint32_t* ids = NULL;
    size_t a = 0, b = 0;
    report_bad("output_sparse_not_requested", r3_output_sparse(out, 0, &ids, &data, &a),
               R3_ERR_NOT_REQUESTED);
    report_bad("output_colbert_not_requested", r3_output_colbert(out, 0, &data, &a, &b),
               R3_ERR_NOT_REQUESTED);
    report_bad("output_dense_null_out", r3_output_dense(out, &data, NULL, &b), R3_ERR_NULL_POINTER);
    report_bad("output_count_null", r3_output_count(NULL, &a), R3_ERR_NULL_POINTER);
    r3_output_free(out);
    MUST(r3_encode_options_init(&opts));
    opts.colbert = 1;
    MUST(r3_encode(model, texts, 1, &opts, &out));
    report_bad("output_colbert_out_of_range", r3_output_colbert(out, 1, &data, &a, &b),
               R3_ERR_OUT_OF_RANGE);
    r3_output_free(out);

    float out5[R3_SCORE_COUNT] = {-7.0f, -7.0f, -7.0f, -7.0f, -7.0f};
    const char* const q[] = {"query"};
    const char* const p_bad[] = {"\xff"};
    r3_score_options sopts;
    MUST(r3_score_options_init(&sopts));
    sopts.weights[1] = -1.0f;
    report_bad("score_negative_weight", r3_score(model, q, q, 1, &sopts, out5),
               R3_ERR_INVALID_ARGUMENT);
    report_bad("score_null_out5", r3_score(model, q, q, 1, NULL, NULL), R3_ERR_NULL_POINTER);
    report_bad("score_null_passages", r3_score(model, q, NULL, 1, NULL, out5), R3_ERR_NULL_POINTER);
    report_bad("score_invalid_utf8", r3_score(model, q, p_bad, 1, NULL, out5), R3_ERR_INVALID_UTF8);
    report_bad("score_null_model", r3_score(NULL, q, q, 1, NULL, out5), R3_ERR_NULL_POINTER);
    CHECK(out5[0] == -7.0f && out5[4] == -7.0f, "out5 written on failure");

    /* Freeing NULL is a no-op; a success clears the message. */
    r3_model_free(NULL);
    r3_output_free(NULL);
    MUST(r3_encode_options_init(&opts));
    CHECK(strcmp(r3_last_error(), "") == 0, "success must clear the last error");
    CHECK(strcmp(r3_status_name(R3_ERR_IO), "R3_ERR_IO") == 0, "status name");
    CHECK(strcmp(r3_status_name(99), "R3_UNKNOWN_STATUS") == 0, "unknown status name");
}

/* ---- Threads: one model shared by several threads ----------------------------------------- */

typedef struct {
    const r3_model* model;
    const float* reference; /* dense rows from the main thread */
    size_t dim;
    int ok;
} thread_job;

static void* thread_main(void* arg) {
    thread_job* job = (thread_job*)arg;
    job->ok = 1;
    for (int round = 0; round < 3; round++) {
        r3_output* out = NULL;
        r3_encode_options opts;
        if (r3_encode_options_init(&opts) != R3_OK) job->ok = 0;
        opts.sparse = 1;
        if (r3_encode(job->model, TEXTS, N_TEXTS, &opts, &out) != R3_OK) {
            job->ok = 0;
            return NULL;
        }
        const float* dense = NULL;
        size_t n = 0, dim = 0;
        if (r3_output_dense(out, &dense, &n, &dim) != R3_OK || n != N_TEXTS || dim != job->dim) {
            job->ok = 0;
        } else {
            for (size_t k = 0; k < n * dim; k++) {
                if (fabsf(dense[k] - job->reference[k]) > 1e-6f) job->ok = 0;
            }
        }
        r3_output_free(out);
        /* An error on this thread must not touch the main thread's message. */
        if (r3_encode(job->model, NULL, 1, NULL, &out) != R3_ERR_NULL_POINTER) job->ok = 0;
    }
    return NULL;
}

static void threads(const r3_model* model) {
    r3_output* out = NULL;
    MUST(r3_encode(model, TEXTS, N_TEXTS, NULL, &out));
    const float* ref = NULL;
    size_t n = 0, dim = 0;
    MUST(r3_output_dense(out, &ref, &n, &dim));

    /* Leave an error on the main thread; the workers' own errors must not replace it. */
    r3_output* bad = NULL;
    CHECK(r3_encode(NULL, TEXTS, 1, NULL, &bad) == R3_ERR_NULL_POINTER, "main-thread error");
    char before[256];
    snprintf(before, sizeof before, "%s", r3_last_error());

    enum { N_THREADS = 4 };
    pthread_t tid[N_THREADS];
    thread_job jobs[N_THREADS];
    for (int t = 0; t < N_THREADS; t++) {
        jobs[t] = (thread_job){model, ref, dim, 0};
        CHECK(pthread_create(&tid[t], NULL, thread_main, &jobs[t]) == 0, "pthread_create");
    }
    for (int t = 0; t < N_THREADS; t++) {
        pthread_join(tid[t], NULL);
        CHECK(jobs[t].ok, "thread %d", t);
    }
    CHECK(strcmp(before, r3_last_error()) == 0, "another thread changed this thread's error");
    r3_output_free(out);
    printf("threads ok\n");
}

/* ---- fork(): a child of a process that computed gets an error, not a hang -------------------- */

/* Before the parent computes (loading and calls refused before any work start no worker thread),
 * a forked child encodes normally. */
static void fork_before_computing(const r3_model* model) {
    r3_encode_options eo;
    MUST(r3_encode_options_init(&eo));
    eo.max_length = 1000000; /* refused before any work */
    r3_output* out = NULL;
    CHECK(r3_encode(model, TEXTS, 1, &eo, &out) == R3_ERR_INVALID_ARGUMENT, "huge max_length");
    r3_score_options so;
    MUST(r3_score_options_init(&so));
    so.weights[0] = so.weights[1] = 0.0f; /* refused before any work */
    float out5[5];
    CHECK(r3_score(model, QUERIES, PASSAGES, 1, &so, out5) == R3_ERR_INVALID_ARGUMENT, "weights");
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        alarm(60);
        r3_output* o = NULL;
        r3_status s = r3_encode(model, TEXTS, 2, NULL, &o);
        if (s != R3_OK) fprintf(stderr, "FAIL early child: %s: %s\n", r3_status_name(s), r3_last_error());
        r3_output_free(o);
        _exit(s == R3_OK ? 0 : 1);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "early forked child: status %d", status);
}

static void forked_child(const r3_model* model) {
    /* The parent has encoded (its worker threads exist there only). */
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        alarm(60); /* a hang would otherwise stall the test: SIGALRM fails it */
        r3_output* out = NULL;
        r3_status s = r3_encode(model, TEXTS, 1, NULL, &out);
        const char* msg = r3_last_error();
        int ok = s == R3_ERR_UNSUPPORTED && out == NULL && strstr(msg, "fork()") != NULL;
        float out5[5];
        s = r3_score(model, QUERIES, PASSAGES, 1, NULL, out5);
        ok = ok && s == R3_ERR_UNSUPPORTED;
        if (!ok) fprintf(stderr, "FAIL child: %s: %s\n", r3_status_name(s), r3_last_error());
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "forked child: status %d", status);
    /* The parent goes on computing. */
    r3_output* out = NULL;
    MUST(r3_encode(model, TEXTS, 1, NULL, &out));
    r3_output_free(out);
    printf("fork ok\n");
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    printf("version %s\n", r3_version());
    CHECK(strcmp(r3_version(), R3_VERSION) == 0, "header %s vs library %s", R3_VERSION,
          r3_version());
    print_layouts();
    print_inputs();

    r3_model* model = NULL;
    MUST(r3_model_load(argv[1], "cpu", &model));
    fork_before_computing(model);
    encode_all(model);
    encode_options(model);
    score(model);
    bad_inputs(model, argv[1]);
    threads(model);
    forked_child(model);
    r3_model_free(model);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("done\n");
    return 0;
}
