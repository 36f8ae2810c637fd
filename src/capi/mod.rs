//! The stable C ABI (`include/retrom3.h`, built into `libretrom3.a` and `libretrom3.so`): opaque
//! model and output handles, plain C option structs, integer status codes and a thread-local
//! last-error message. See `docs/c-api.md` for the contract of every call.
//!
//! Every entry point runs its body inside `catch_unwind` (`status::guard`), checks each pointer
//! and string before use, and reports failure as an [`R3Status`] plus a one-line message
//! (`r3_last_error`); nothing panics across the boundary or aborts the host program.
//!
//! `include/retrom3.h` is written by hand and checked against these signatures by
//! `tests/capi.rs` (names, parameter names and types, struct fields and layouts, constants).
//! Change both together.

mod model;
mod output;
mod status;

pub use model::{
    r3_encode, r3_encode_options_init, r3_model_free, r3_model_load, r3_score,
    r3_score_options_init, R3EncodeOptions, R3Model, R3ScoreOptions, R3_NORMALIZE_DEFAULT,
    R3_NORMALIZE_NO, R3_NORMALIZE_YES, R3_POOLING_CLS, R3_POOLING_DEFAULT, R3_POOLING_MEAN,
    R3_SCORE_COLBERT, R3_SCORE_COLBERT_SPARSE_DENSE, R3_SCORE_COUNT, R3_SCORE_DENSE,
    R3_SCORE_SPARSE, R3_SCORE_SPARSE_DENSE,
};
pub use output::{
    r3_output_colbert, r3_output_count, r3_output_dense, r3_output_free, r3_output_sparse, R3Output,
};
pub use status::R3Status;

use std::ffi::c_char;

/// The library version ("0.1.0"), a static NUL-terminated string: never free it. Compare with
/// the header's `R3_VERSION` to detect a header / library mismatch.
#[no_mangle]
pub extern "C" fn r3_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// This thread's last error message: "" after a call that returned `R3_OK`, else one line
/// naming what went wrong. Never NULL. The string belongs to the library and stays valid until
/// the next `r3_*` call on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn r3_last_error() -> *const c_char {
    std::panic::catch_unwind(status::last_error_ptr).unwrap_or(c"".as_ptr())
}

/// The C name of a status code ("R3_ERR_NULL_POINTER"), a static string; "R3_UNKNOWN_STATUS"
/// for a value that is not one. Never NULL; never free it.
#[no_mangle]
pub extern "C" fn r3_status_name(status: i32) -> *const c_char {
    std::panic::catch_unwind(|| {
        R3Status::from_raw(status).map_or(c"R3_UNKNOWN_STATUS", R3Status::c_name)
    })
    .unwrap_or(c"R3_UNKNOWN_STATUS")
    .as_ptr()
}
