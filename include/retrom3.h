/*
 * retrom3.h -- the C ABI of retrom3: BGE-M3-style inference (dense, sparse, ColBERT) and scoring.
 *
 * Link with libretrom3.a (plus -lpthread -ldl -lm on Linux) or libretrom3.so, both built by
 * `cargo build --release` into target/release/. Full reference: docs/c-api.md.
 *
 * Conventions
 *   - Every fallible call returns an r3_status: R3_OK (0) or an R3_ERR_* code. On failure
 *     r3_last_error() gives a one-line message; on success the message is cleared to "".
 *   - Out-pointers are set to NULL (handles) or left unchanged (arrays) on failure.
 *   - No call panics across the boundary or aborts the program (except on out-of-memory, which
 *     aborts as in any Rust program). NULL pointers, invalid UTF-8, missing files and bad
 *     options return an error status with a message.
 *   - Using a freed handle is undefined behaviour (it is not detected); freeing NULL is a no-op.
 *
 * Threads
 *   - r3_model: immutable after load; r3_encode and r3_score may be called on one model from
 *     many threads at once. r3_model_free must not race with any other use of that model.
 *   - r3_output: immutable; its accessors may run from many threads at once. r3_output_free must
 *     not race with any other use of that output.
 *   - r3_last_error is per thread: a call on one thread never changes another thread's message.
 *   - fork(): the library's worker threads live in the process that first encoded or scored. A
 *     child forked after that gets R3_ERR_UNSUPPORTED from r3_encode / r3_score (it would
 *     otherwise wait for threads it does not have): encode in the parent only, or in children
 *     only (the parent may load CPU models before forking; a CUDA context never survives a
 *     fork, so load "cuda" models in the child), or start children with spawn.
 *
 * Ownership
 *   - r3_model_load / r3_encode create handles the caller owns; free them with r3_model_free /
 *     r3_output_free. An output does not borrow its model: it may outlive it.
 *   - Pointers returned by the r3_output_* accessors point into the output and are valid until
 *     r3_output_free; never free them yourself.
 *   - Strings returned by r3_version and r3_status_name are static; r3_last_error's is valid
 *     until the next r3_* call on the same thread.
 *   - Input strings and arrays are only read during the call; the library keeps no pointer.
 *
 * Strings are NUL-terminated UTF-8.
 */
#ifndef RETROM3_H
#define RETROM3_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version this header describes; r3_version() returns the library's. */
#define R3_VERSION "0.1.0"

/* Status codes (values are stable). */
typedef int32_t r3_status;
enum {
    R3_OK = 0,
    R3_ERR_NULL_POINTER = 1,     /* a required pointer argument was NULL */
    R3_ERR_INVALID_UTF8 = 2,     /* a string argument was not valid UTF-8 */
    R3_ERR_INVALID_ARGUMENT = 3, /* bad option or argument value (device, pooling, weights...) */
    R3_ERR_IO = 4,               /* a file or directory could not be read (missing model dir) */
    R3_ERR_FORMAT = 5,           /* a model file is malformed or inconsistent */
    R3_ERR_UNSUPPORTED = 6,      /* not available in this build / on this machine (cuda) */
    R3_ERR_NON_FINITE = 7,       /* a non-finite value where a finite one is required */
    R3_ERR_NOT_REQUESTED = 8,    /* an output accessor for a head r3_encode did not compute */
    R3_ERR_OUT_OF_RANGE = 9,     /* a text index past the end of an output */
    R3_ERR_PANIC = 10,           /* an internal panic was caught (a bug: please report it) */
    R3_ERR_OTHER = 11            /* any other error */
};

/* r3_encode_options.pooling */
enum {
    R3_POOLING_DEFAULT = 0, /* the model directory's pooling (sentence-transformers), else CLS */
    R3_POOLING_CLS = 1,     /* first token's hidden state (bge-m3) */
    R3_POOLING_MEAN = 2     /* attention-masked mean over tokens */
};

/* r3_encode_options.normalize */
enum {
    R3_NORMALIZE_DEFAULT = 0, /* the model directory's choice, else normalise */
    R3_NORMALIZE_YES = 1,     /* L2-normalise dense vectors */
    R3_NORMALIZE_NO = 2       /* raw pooled vectors */
};

/* Index of each score in a pair's row of r3_score's out5 (5 floats per pair). */
enum {
    R3_SCORE_DENSE = 0,
    R3_SCORE_SPARSE = 1,
    R3_SCORE_COLBERT = 2,
    R3_SCORE_SPARSE_DENSE = 3,         /* (w_sparse*sparse + w_dense*dense) / (w_dense + w_sparse) */
    R3_SCORE_COLBERT_SPARSE_DENSE = 4, /* weighted mean of all three */
    R3_SCORE_COUNT = 5
};

/* A loaded model (opaque). */
typedef struct r3_model r3_model;

/* The result of r3_encode (opaque). */
typedef struct r3_output r3_output;

/* Options of r3_encode. Fill with r3_encode_options_init, then change fields. */
typedef struct r3_encode_options {
    int32_t dense;     /* nonzero: compute dense vectors (init: 1) */
    int32_t sparse;    /* nonzero: compute sparse lexical weights; needs the M3 heads (init: 0) */
    int32_t colbert;   /* nonzero: compute ColBERT vectors; needs the M3 heads (init: 0) */
    int32_t pooling;   /* R3_POOLING_* (init: R3_POOLING_DEFAULT) */
    int32_t normalize; /* R3_NORMALIZE_* (init: R3_NORMALIZE_DEFAULT) */
    size_t max_length; /* max tokens per text, specials included; 0: the model's default */
    size_t batch_size; /* texts per forward pass; 0: 32 */
} r3_encode_options;

/* Options of r3_score. Fill with r3_score_options_init, then change fields. */
typedef struct r3_score_options {
    float weights[3];          /* w_dense, w_sparse, w_colbert: each in [0, 1e6], w_dense +
                                  w_sparse > 0 (init: 1, 1, 1) */
    size_t max_query_length;   /* max tokens per query; 0: 512 (or the model's max if lower) */
    size_t max_passage_length; /* max tokens per passage; 0: 512 (or the model's max if lower) */
    size_t batch_size;         /* texts per forward pass; 0: 32 */
} r3_score_options;

/* ---- Library -------------------------------------------------------------------------------- */

/* The library version, e.g. "0.1.0" (static; thread-safe). */
const char* r3_version(void);

/* This thread's last error message, "" if the last call succeeded. Never NULL. Valid until the
 * next r3_* call on this thread. */
const char* r3_last_error(void);

/* The name of a status code, e.g. "R3_ERR_NULL_POINTER"; "R3_UNKNOWN_STATUS" otherwise
 * (static; thread-safe). */
const char* r3_status_name(r3_status status);

/* Fill *opts with the defaults (dense only, model defaults, batch 32). Thread-safe. */
r3_status r3_encode_options_init(r3_encode_options* opts);

/* Fill *opts with the defaults (weights 1,1,1; lengths 0: 512 or the model's max if lower;
 * batch 32). Thread-safe. */
r3_status r3_score_options_init(r3_score_options* opts);

/* ---- Model ---------------------------------------------------------------------------------- */

/* Load a model directory (Hugging Face / FlagEmbedding layout: config.json, model.safetensors or
 * pytorch_model.bin, tokenizer.json, optional colbert_linear.pt + sparse_linear.pt).
 * device: "cpu", "cuda" or "cuda:N" ("emu" in builds with the emulator); NULL means "cpu".
 * On success *out is a new handle owned by the caller (free with r3_model_free); on failure
 * *out is NULL. Errors: R3_ERR_NULL_POINTER (dir, out), R3_ERR_INVALID_UTF8,
 * R3_ERR_INVALID_ARGUMENT (device name), R3_ERR_IO (missing or unreadable directory,
 * config.json or tokenizer.json), R3_ERR_FORMAT (bad model files, no weights file, one head
 * file without the other), R3_ERR_UNSUPPORTED (cuda not built / no driver).
 * Thread-safe (each call creates an independent handle). */
r3_status r3_model_load(const char* dir, const char* device, r3_model** out);

/* Free a model. NULL is a no-op. No other thread may be using it; do not use it again.
 * Outputs created from it stay valid. */
void r3_model_free(r3_model* model);

/* ---- Encode --------------------------------------------------------------------------------- */

/* Encode texts[0..n) (texts may be NULL when n is 0). options NULL: r3_encode_options_init's
 * defaults. On success *out is a new output owned by the caller (free with r3_output_free); on
 * failure *out is NULL. Errors: R3_ERR_NULL_POINTER (model, texts, texts[i], out),
 * R3_ERR_INVALID_UTF8 (texts[i]), R3_ERR_INVALID_ARGUMENT (options, e.g. nothing requested,
 * max_length over the model's, sparse/colbert on a model without M3 heads).
 * Thread-safe: many threads may encode with the same model at once. */
r3_status r3_encode(const r3_model* model, const char* const* texts, size_t n,
                    const r3_encode_options* options, r3_output** out);

/* Number of texts in an output (the n given to r3_encode). */
r3_status r3_output_count(const r3_output* output, size_t* n);

/* Dense vectors: *data -> n x dim floats, row-major, row i for texts[i] (NULL when n is 0).
 * Errors: R3_ERR_NULL_POINTER, R3_ERR_NOT_REQUESTED (options.dense was 0). */
r3_status r3_output_dense(const r3_output* output, const float** data, size_t* n, size_t* dim);

/* Sparse lexical weights of texts[i]: *len pairs (*ids)[k], (*weights)[k]; ids ascending,
 * weights > 0, the tokenizer's cls, eos, pad and unk ids dropped (as FlagEmbedding); both NULL
 * when *len is 0.
 * Errors: R3_ERR_NULL_POINTER, R3_ERR_NOT_REQUESTED, R3_ERR_OUT_OF_RANGE (i >= n). */
r3_status r3_output_sparse(const r3_output* output, size_t i, const uint32_t** ids,
                           const float** weights, size_t* len);

/* ColBERT vectors of texts[i]: *data -> count x dim floats, row-major, one normalised row per
 * token after CLS (</s> included).
 * Errors: R3_ERR_NULL_POINTER, R3_ERR_NOT_REQUESTED, R3_ERR_OUT_OF_RANGE (i >= n). */
r3_status r3_output_colbert(const r3_output* output, size_t i, const float** data, size_t* count,
                            size_t* dim);

/* Free an output and all arrays its accessors returned. NULL is a no-op. No other thread may be
 * using it; do not use it or those arrays again. */
void r3_output_free(r3_output* output);

/* ---- Score ---------------------------------------------------------------------------------- */

/* Score n (query, passage) pairs, queries[i] with passages[i] (FlagEmbedding's compute_score).
 * On success out5[5*i + R3_SCORE_*] holds pair i's five scores; on failure out5 is unchanged.
 * out5 must hold 5*n floats (it may be NULL when n is 0; so may queries and passages).
 * options NULL: r3_score_options_init's defaults. Needs a model with the M3 heads.
 * Errors: R3_ERR_NULL_POINTER, R3_ERR_INVALID_UTF8, R3_ERR_INVALID_ARGUMENT (weights, lengths,
 * no M3 heads). Thread-safe: many threads may score with the same model at once. */
r3_status r3_score(const r3_model* model, const char* const* queries, const char* const* passages,
                   size_t n, const r3_score_options* options, float* out5);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* RETROM3_H */
