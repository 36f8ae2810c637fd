//! Status codes, the thread-local last-error message, and the guard every entry point runs its
//! body in (catch_unwind, so no panic crosses the FFI boundary).

use crate::error::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The status every fallible `r3_*` function returns (`r3_status`, an `int32_t`, in C).
///
/// The C names are `R3_OK` and `R3_ERR_<VARIANT>` in upper snake case (`NullPointer` is
/// `R3_ERR_NULL_POINTER`); the values are part of the ABI and never change.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum R3Status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 2,
    /// An argument or option value is out of range (device name, pooling, weights, max length...).
    InvalidArgument = 3,
    /// A file or directory could not be read (missing model directory, permissions).
    Io = 4,
    /// A model file is malformed or inconsistent (config, weights, tokenizer).
    Format = 5,
    /// The build or the machine cannot do it (e.g. `cuda` without the feature or a driver).
    Unsupported = 6,
    /// A non-finite value where a finite one is required.
    NonFinite = 7,
    /// An output accessor asked for a head that `r3_encode` was not asked to compute.
    NotRequested = 8,
    /// A text index past the end of an output.
    OutOfRange = 9,
    /// An internal panic was caught at the boundary (a bug in retrom3; please report it).
    Panic = 10,
    /// Any other error.
    Other = 11,
}

impl R3Status {
    /// The C name of the status (`"R3_ERR_NULL_POINTER"`), NUL-terminated.
    pub(crate) fn c_name(self) -> &'static CStr {
        match self {
            R3Status::Ok => c"R3_OK",
            R3Status::NullPointer => c"R3_ERR_NULL_POINTER",
            R3Status::InvalidUtf8 => c"R3_ERR_INVALID_UTF8",
            R3Status::InvalidArgument => c"R3_ERR_INVALID_ARGUMENT",
            R3Status::Io => c"R3_ERR_IO",
            R3Status::Format => c"R3_ERR_FORMAT",
            R3Status::Unsupported => c"R3_ERR_UNSUPPORTED",
            R3Status::NonFinite => c"R3_ERR_NON_FINITE",
            R3Status::NotRequested => c"R3_ERR_NOT_REQUESTED",
            R3Status::OutOfRange => c"R3_ERR_OUT_OF_RANGE",
            R3Status::Panic => c"R3_ERR_PANIC",
            R3Status::Other => c"R3_ERR_OTHER",
        }
    }

    /// The status for a raw `r3_status` value, if it is one.
    pub(crate) fn from_raw(v: i32) -> Option<R3Status> {
        const ALL: [R3Status; 12] = [
            R3Status::Ok,
            R3Status::NullPointer,
            R3Status::InvalidUtf8,
            R3Status::InvalidArgument,
            R3Status::Io,
            R3Status::Format,
            R3Status::Unsupported,
            R3Status::NonFinite,
            R3Status::NotRequested,
            R3Status::OutOfRange,
            R3Status::Panic,
            R3Status::Other,
        ];
        ALL.into_iter().find(|s| *s as i32 == v)
    }
}

/// An error on its way out of an entry point: the status and the message for `r3_last_error`.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: R3Status,
    pub msg: String,
}

impl FfiError {
    pub fn new(status: R3Status, msg: impl Into<String>) -> Self {
        FfiError {
            status,
            msg: msg.into(),
        }
    }

    pub fn null(what: &str) -> Self {
        FfiError::new(R3Status::NullPointer, format!("{what} is NULL"))
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        FfiError::new(R3Status::InvalidArgument, msg)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } => R3Status::Io,
            Error::Format { .. }
            | Error::Config { .. }
            | Error::Shape { .. }
            | Error::DType { .. }
            | Error::MissingTensor { .. }
            | Error::Tokenizer(_) => R3Status::Format,
            Error::Input { .. } | Error::Invalid(_) => R3Status::InvalidArgument,
            Error::Unsupported { .. }
            | Error::NoCudaDriver
            | Error::FeatureMissing(_)
            | Error::NoBackward(_) => R3Status::Unsupported,
            Error::NonFinite(_) => R3Status::NonFinite,
            // Variants added to the crate's enum later map here until they get their own code.
            #[allow(unreachable_patterns)]
            _ => R3Status::Other,
        };
        FfiError::new(status, e.to_string())
    }
}

pub(crate) type FfiResult<T> = std::result::Result<T, FfiError>;

thread_local! {
    // One message per thread, so concurrent callers never see each other's errors.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Store `msg` as this thread's last error. Never panics: interior NULs become spaces, and a
/// thread-local that is already torn down (thread exit) is skipped.
pub(crate) fn set_last_error(msg: &str) {
    // One line, as documented, whatever the message echoes (a path or text with a newline): line
    // breaks and other control characters are written as escapes (`\n`), NULs included.
    let mut line = String::with_capacity(msg.len());
    for ch in msg.chars() {
        if ch.is_control() {
            line.extend(ch.escape_default());
        } else {
            line.push(ch);
        }
    }
    // No NUL is left, so `CString::new` cannot fail; the default is unreachable.
    let c = CString::new(line).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = c;
        }
    });
}

/// The process that first ran a computation through this API (0: none yet). The CPU backend's
/// worker threads (rayon's pool, started by that first computation) exist only there: a child
/// made by `fork()` afterwards inherits the pool's state but not its threads, and would wait for
/// them forever.
static COMPUTING_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Refuses to compute in a child forked after the parent computed (instead of hanging).
pub(crate) fn fork_check() -> FfiResult<()> {
    use std::sync::atomic::Ordering;
    match COMPUTING_PID.load(Ordering::SeqCst) {
        0 => Ok(()),
        pid if pid == std::process::id() => Ok(()),
        pid => Err(FfiError::new(
            R3Status::Unsupported,
            format!(
                "this process was forked from process {pid} after that one encoded or scored: \
                 the library's worker threads do not survive fork(); encode and score only in \
                 the children (loading a CPU model before the fork is fine) or only in the \
                 parent, or start children with spawn (Python: \
                 multiprocessing.get_context(\"spawn\"))"
            ),
        )),
    }
}

/// Marks this process as the one whose worker threads exist, once a computation may have
/// started them: any call but one refused before any work (an invalid option), which leaves a
/// later fork usable. (A call with no text still runs the tokenizer's batch, which starts them.)
pub(crate) fn fork_mark<T>(outcome: &crate::error::Result<T>) {
    use std::sync::atomic::Ordering;
    if !matches!(outcome, Err(crate::error::Error::Invalid(_))) {
        let _ = COMPUTING_PID.compare_exchange(
            0,
            std::process::id(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

/// Clear this thread's last error (every status-returning call does this on entry).
pub(crate) fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = CString::default();
        }
    });
}

/// A pointer to this thread's last error message ("" when none). Valid until the next `r3_*`
/// call on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|e| match e.try_borrow() {
            Ok(s) => s.as_ptr(),
            Err(_) => c"".as_ptr(),
        })
        .unwrap_or(c"".as_ptr())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Run an entry point's body: clear the last error, catch any panic, and turn the outcome into a
/// status (setting the message on failure).
pub(crate) fn guard(body: impl FnOnce() -> FfiResult<()>) -> R3Status {
    clear_last_error();
    // AssertUnwindSafe: after a panic the body's partial state is dropped, never observed again;
    // handles passed in are only read (`&`), so a panic cannot leave them half-updated.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => R3Status::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.msg);
            e.status
        }
        Err(payload) => {
            set_last_error(&format!(
                "internal panic (a retrom3 bug, please report it): {}",
                panic_message(payload.as_ref())
            ));
            R3Status::Panic
        }
    }
}

/// Run a `void` entry point's body (the free functions): catch any panic, record it as the last
/// error, and return.
pub(crate) fn guard_void(body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        set_last_error(&format!(
            "internal panic (a retrom3 bug, please report it): {}",
            panic_message(payload.as_ref())
        ));
    }
}

/// Borrow a NUL-terminated UTF-8 string argument; `what` names it in the error.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a` and is not written to.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|e| {
        FfiError::new(
            R3Status::InvalidUtf8,
            format!(
                "{what} is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// Borrow an array of `n` string arguments (`texts[0..n]`); the array may be NULL when `n` is 0.
///
/// # Safety
/// `p` is NULL or points to `n` readable pointers, each NULL or a NUL-terminated string, all
/// outliving `'a`.
pub(crate) unsafe fn str_array_arg<'a>(
    p: *const *const c_char,
    n: usize,
    what: &str,
) -> FfiResult<Vec<&'a str>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    if n > isize::MAX as usize / std::mem::size_of::<*const c_char>() {
        return Err(FfiError::invalid(format!("{what}: count {n} is too large")));
    }
    // SAFETY: non-null, `n` elements readable per the caller's contract, size checked above.
    let ptrs = unsafe { std::slice::from_raw_parts(p, n) };
    ptrs.iter()
        .enumerate()
        // SAFETY: each element is NULL or a NUL-terminated string per the caller's contract.
        .map(|(i, &s)| unsafe { str_arg(s, &format!("{what}[{i}]")) })
        .collect()
}

/// Write `value` through a required out-pointer.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T, what: &str) -> FfiResult<()> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and writable per the caller's contract; `T` is a plain C value (pointer,
    // size_t), so nothing is dropped by overwriting it.
    unsafe { p.write(value) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: last_error_ptr always returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = guard(|| panic!("boom {}", 42));
        assert_eq!(s, R3Status::Panic);
        assert!(last().contains("boom 42"), "{}", last());
        assert_eq!(guard(|| Ok(())), R3Status::Ok);
        assert_eq!(last(), "");
        guard_void(|| panic!("in free"));
        assert!(last().contains("in free"));
    }

    #[test]
    fn errors_map_to_their_status_and_nuls_are_kept_out() {
        let s = guard(|| Err(Error::invalid("a\0b\nc\td").into()));
        assert_eq!(s, R3Status::InvalidArgument);
        // One line, no NUL to cut it short: control characters are written as escapes.
        assert_eq!(last(), "invalid argument: a\\u{0}b\\nc\\td");
        let s = guard(|| Err(Error::FeatureMissing("cuda").into()));
        assert_eq!(s, R3Status::Unsupported);
    }

    #[test]
    fn every_status_round_trips_through_its_raw_value() {
        for v in 0..12 {
            let s = R3Status::from_raw(v).unwrap();
            assert_eq!(s as i32, v);
            assert!(s.c_name().to_str().unwrap().starts_with("R3_"));
        }
        assert_eq!(R3Status::from_raw(12), None);
        assert_eq!(R3Status::from_raw(-1), None);
    }
}
