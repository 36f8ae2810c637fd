//! The C ABI (`include/retrom3.h`, `src/capi/`):
//! - the committed header matches the Rust signatures (functions, parameter names and types,
//!   struct fields, constants, version);
//! - `tests/c/capi_test.c`, compiled with the system C compiler and linked against the static
//!   library, encodes and scores the tiny fixture and prints numbers that equal the Rust API's,
//!   struct layouts that equal Rust's `repr(C)`, and bad-input statuses with messages;
//! - the README's C example compiles and runs as written;
//! - the same bad inputs and a full round trip through the `extern "C"` functions called from Rust.

use retrom3::capi::*;
use retrom3::{Device, EncodeOptions, M3Model, Pooling, ScoreOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;
use std::sync::OnceLock;

const TOL: f32 = 1e-6;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    manifest().join("tests/fixtures").join(name)
}

fn tiny_model() -> &'static M3Model {
    static MODEL: OnceLock<M3Model> = OnceLock::new();
    MODEL.get_or_init(|| M3Model::load(fixture("tiny-xlmr"), Device::Cpu).unwrap())
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= TOL * want.abs().max(1.0)
}

fn assert_close_slices(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w), "{what}[{k}]: C gave {g}, Rust {w}");
    }
}

// ---- Building and running C programs against the static library --------------------------------

/// The static library cargo built with this test, copied into `dir`: rustc writes it next to the
/// test executable (target/<profile>/deps/, unhashed because the crate is also a cdylib) and
/// cargo copies it up to target/<profile>/. The copy keeps a concurrent `cargo build` that
/// rewrites those files from pulling the archive out from under the linker; a missing archive is
/// retried a few times for the same reason.
fn staticlib_copy(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable lives in target/<profile>/deps");
    let mut candidates = [
        deps.parent().unwrap_or(deps).join("libretrom3.a"),
        deps.join("libretrom3.a"),
    ];
    // The newest first: the unhashed archive is shared by builds with other features (`emu`
    // links a C++ runtime), and the copy in target/<profile>/ may be an older build's.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&candidates[1]) > modified(&candidates[0]) {
        candidates.swap(0, 1);
    }
    let dst = dir.join("libretrom3.a");
    for _attempt in 0..10 {
        for src in &candidates {
            if std::fs::copy(src, &dst).is_ok() && is_archive(&dst) {
                return dst;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    panic!(
        "libretrom3.a is missing (looked at {} and {}): the C tests link the static library, \
         which cargo builds when Cargo.toml's [lib] crate-type lists \"staticlib\"",
        candidates[0].display(),
        candidates[1].display()
    )
}

fn is_archive(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"!<arch>\n"
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        })
        .unwrap_or_else(|| format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
}

/// The system libraries a Rust staticlib needs (`rustc --print native-static-libs`).
fn native_libs() -> &'static [&'static str] {
    if cfg!(target_os = "linux") {
        &[
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]
    } else {
        &["-lpthread", "-ldl", "-lm"]
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-capi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compile `source` (strict C11, warnings are errors) with the `cc` crate and link it with the
/// system compiler against libretrom3.a. Returns the executable.
fn build_c_program(source: &Path, tag: &str) -> PathBuf {
    let dir = scratch_dir(tag);
    let lib = staticlib_copy(&dir);
    let triple = host_triple();
    let mut build = cc::Build::new();
    build
        .file(source)
        .include(manifest().join("include"))
        .cargo_metadata(false)
        .cargo_warnings(false)
        .cargo_debug(false)
        .out_dir(&dir)
        .target(&triple)
        .host(&triple)
        .opt_level(1)
        .debug(false)
        .std("c11")
        .warnings(true)
        .extra_warnings(true)
        .flag("-Wpedantic")
        .warnings_into_errors(true);
    let objects = build
        .try_compile_intermediates()
        .unwrap_or_else(|e| panic!("compiling {}: {e}", source.display()));
    let exe = dir.join(tag);
    let compiler = build.get_compiler();
    let out = Command::new(compiler.path())
        .args(&objects)
        .arg(&lib)
        .args(native_libs())
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run the system C compiler to link");
    // The archive copy is large (the whole crate and std); the executable is all we keep.
    let _ = std::fs::remove_file(&lib);
    assert!(
        out.status.success(),
        "linking {} against libretrom3.a failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// stdout of tests/c/capi_test.c on the tiny fixture (built and run once per test process).
fn c_program_output() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        let exe = build_c_program(&manifest().join("tests/c/capi_test.c"), "capi_test");
        let out = Command::new(&exe)
            .arg(fixture("tiny-xlmr"))
            .current_dir(manifest())
            .output()
            .expect("run capi_test");
        let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
        assert!(
            out.status.success(),
            "capi_test failed ({}):\n{}\nstdout:\n{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.lines().any(|l| l == "done"), "{stdout}");
        // A child forked after the parent encoded got R3_ERR_UNSUPPORTED, not a hang.
        assert!(stdout.lines().any(|l| l == "fork ok"), "{stdout}");
        // The executable embeds the whole library (~100 MB); kept only when a check failed.
        let _ = std::fs::remove_dir_all(exe.parent().unwrap());
        stdout
    })
}

/// The records of one kind (`dense`, `score`, ...), each as its fields after the kind.
fn records(kind: &str) -> Vec<Vec<&'static str>> {
    c_program_output()
        .lines()
        .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
        .map(|rest| rest.split(' ').collect())
        .collect()
}

fn floats(fields: &[&str]) -> Vec<f32> {
    fields.iter().map(|f| f.parse().unwrap()).collect()
}

fn unhex(h: &str) -> String {
    if h == "-" {
        return String::new();
    }
    let bytes: Vec<u8> = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn c_texts() -> Vec<String> {
    records("text").iter().map(|r| unhex(r[1])).collect()
}

// ---- The C program against the Rust API --------------------------------------------------------

#[test]
fn c_encode_all_heads_matches_the_rust_api() {
    let texts = c_texts();
    assert_eq!(texts.len(), 4);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want = tiny_model().encode(&refs, &EncodeOptions::all()).unwrap();

    let dense = want.dense.unwrap();
    let rows: Vec<_> = records("dense")
        .into_iter()
        .filter(|r| r[0] == "all")
        .collect();
    assert_eq!(rows.len(), texts.len());
    for r in rows {
        let i: usize = r[1].parse().unwrap();
        let dim: usize = r[2].parse().unwrap();
        assert_eq!(dim, 32);
        assert_close_slices(&format!("dense[{i}]"), &floats(&r[3..]), &dense[i]);
    }

    let sparse = want.sparse.unwrap();
    let rows = records("sparse");
    assert_eq!(rows.len(), texts.len());
    for r in rows {
        let i: usize = r[0].parse().unwrap();
        let len: usize = r[1].parse().unwrap();
        assert_eq!(len, sparse[i].len(), "sparse[{i}] length");
        for (k, pair) in r[2..].iter().enumerate() {
            let (id, w) = pair.split_once(':').unwrap();
            assert_eq!(
                id.parse::<u32>().unwrap(),
                sparse[i][k].0,
                "sparse[{i}][{k}] id"
            );
            let w: f32 = w.parse().unwrap();
            assert!(
                close(w, sparse[i][k].1),
                "sparse[{i}][{k}]: {w} vs {}",
                sparse[i][k].1
            );
        }
    }

    let colbert = want.colbert.unwrap();
    let rows = records("colbert");
    assert_eq!(rows.len(), texts.len());
    for r in rows {
        let i: usize = r[0].parse().unwrap();
        let (count, dim): (usize, usize) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        assert_eq!(count, colbert[i].len(), "colbert[{i}] count");
        assert_eq!(dim, colbert[i][0].len(), "colbert[{i}] dim");
        assert_close_slices(
            &format!("colbert[{i}]"),
            &floats(&r[3..]),
            &colbert[i].concat(),
        );
    }
}

#[test]
fn c_encode_options_match_the_rust_options() {
    let texts = c_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let opts = EncodeOptions {
        max_length: Some(8),
        batch_size: 1,
        pooling: Some(Pooling::Mean),
        normalize: Some(false),
        ..Default::default()
    };
    let want = tiny_model().encode(&refs, &opts).unwrap().dense.unwrap();
    let want_default = tiny_model()
        .encode(&refs[..1], &EncodeOptions::default())
        .unwrap()
        .dense
        .unwrap();
    let mut seen = 0;
    for r in records("dense") {
        let i: usize = r[1].parse().unwrap();
        match r[0] {
            "opts" => assert_close_slices(&format!("opts[{i}]"), &floats(&r[3..]), &want[i]),
            "null" => assert_close_slices("null options", &floats(&r[3..]), &want_default[i]),
            _ => continue,
        }
        seen += 1;
    }
    assert_eq!(seen, texts.len() + 1);
}

#[test]
fn c_scores_match_the_rust_api() {
    let pairs: Vec<(String, String)> = records("pair")
        .iter()
        .map(|r| (unhex(r[1]), unhex(r[2])))
        .collect();
    assert_eq!(pairs.len(), 3);
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(q, p)| (q.as_str(), p.as_str()))
        .collect();
    let model = tiny_model();
    let opts = ScoreOptions {
        max_query_length: Some(model.max_length),
        max_passage_length: Some(16),
        weights: [0.4, 0.2, 0.4],
        batch_size: 32,
    };
    let want = model.compute_score(&refs, &opts).unwrap();
    let rows = records("score");
    assert_eq!(rows.len(), pairs.len());
    for r in rows {
        let i: usize = r[0].parse().unwrap();
        let w = want[i];
        let w5 = [
            w.dense,
            w.sparse,
            w.colbert,
            w.sparse_dense,
            w.colbert_sparse_dense,
        ];
        assert_close_slices(&format!("score[{i}]"), &floats(&r[1..]), &w5);
    }
}

#[test]
fn c_struct_layouts_match_repr_c() {
    use std::mem::{offset_of, size_of};
    /// sizeof and (field, offsetof) pairs.
    type Layout = (usize, Vec<(&'static str, usize)>);
    let want: BTreeMap<&str, Layout> = BTreeMap::from([
        (
            "r3_encode_options",
            (
                size_of::<R3EncodeOptions>(),
                vec![
                    ("dense", offset_of!(R3EncodeOptions, dense)),
                    ("sparse", offset_of!(R3EncodeOptions, sparse)),
                    ("colbert", offset_of!(R3EncodeOptions, colbert)),
                    ("pooling", offset_of!(R3EncodeOptions, pooling)),
                    ("normalize", offset_of!(R3EncodeOptions, normalize)),
                    ("max_length", offset_of!(R3EncodeOptions, max_length)),
                    ("batch_size", offset_of!(R3EncodeOptions, batch_size)),
                ],
            ),
        ),
        (
            "r3_score_options",
            (
                size_of::<R3ScoreOptions>(),
                vec![
                    ("weights", offset_of!(R3ScoreOptions, weights)),
                    (
                        "max_query_length",
                        offset_of!(R3ScoreOptions, max_query_length),
                    ),
                    (
                        "max_passage_length",
                        offset_of!(R3ScoreOptions, max_passage_length),
                    ),
                    ("batch_size", offset_of!(R3ScoreOptions, batch_size)),
                ],
            ),
        ),
    ]);
    let rows = records("layout");
    assert_eq!(rows.len(), want.len());
    for r in rows {
        let (size, fields) = &want[r[0]];
        assert_eq!(r[1].parse::<usize>().unwrap(), *size, "sizeof {}", r[0]);
        let got: Vec<(&str, usize)> = r[2..]
            .iter()
            .map(|f| {
                let (n, o) = f.split_once('=').unwrap();
                (n, o.parse().unwrap())
            })
            .collect();
        assert_eq!(&got, fields, "offsets of {}", r[0]);
    }
}

#[test]
fn c_bad_inputs_return_statuses_with_messages() {
    // The C program already checked each status; here: every case ran, and the messages say
    // what went wrong.
    let bad: BTreeMap<&str, (&str, String)> = records("bad")
        .into_iter()
        .map(|r| (r[0], (r[1], r[2..].join(" "))))
        .collect();
    let expect = [
        ("load_null_dir", "R3_ERR_NULL_POINTER", "dir is NULL"),
        ("load_null_out", "R3_ERR_NULL_POINTER", "out is NULL"),
        (
            "load_missing_dir",
            "R3_ERR_IO",
            "/nonexistent/retrom3-model",
        ),
        (
            "load_invalid_utf8",
            "R3_ERR_INVALID_UTF8",
            "dir is not valid UTF-8",
        ),
        (
            "load_bad_device",
            "R3_ERR_INVALID_ARGUMENT",
            "unknown device 'tpu'",
        ),
        ("load_cuda_unsupported", "R3_ERR_UNSUPPORTED", "cuda"),
        ("encode_null_model", "R3_ERR_NULL_POINTER", "model is NULL"),
        ("encode_null_texts", "R3_ERR_NULL_POINTER", "texts is NULL"),
        (
            "encode_null_text",
            "R3_ERR_NULL_POINTER",
            "texts[1] is NULL",
        ),
        ("encode_null_out", "R3_ERR_NULL_POINTER", "out is NULL"),
        (
            "encode_invalid_utf8",
            "R3_ERR_INVALID_UTF8",
            "texts[1] is not valid UTF-8",
        ),
        (
            "encode_nothing_requested",
            "R3_ERR_INVALID_ARGUMENT",
            "nothing requested",
        ),
        ("encode_bad_pooling", "R3_ERR_INVALID_ARGUMENT", "pooling 7"),
        (
            "encode_max_length_too_big",
            "R3_ERR_INVALID_ARGUMENT",
            "max_length 100000",
        ),
        ("options_init_null", "R3_ERR_NULL_POINTER", "opts is NULL"),
        (
            "output_sparse_not_requested",
            "R3_ERR_NOT_REQUESTED",
            "sparse",
        ),
        (
            "output_colbert_not_requested",
            "R3_ERR_NOT_REQUESTED",
            "colbert",
        ),
        (
            "output_dense_null_out",
            "R3_ERR_NULL_POINTER",
            "out-pointer",
        ),
        ("output_count_null", "R3_ERR_NULL_POINTER", "output is NULL"),
        (
            "output_colbert_out_of_range",
            "R3_ERR_OUT_OF_RANGE",
            "text index 1",
        ),
        (
            "score_negative_weight",
            "R3_ERR_INVALID_ARGUMENT",
            "weights",
        ),
        ("score_null_out5", "R3_ERR_NULL_POINTER", "out5 is NULL"),
        (
            "score_null_passages",
            "R3_ERR_NULL_POINTER",
            "passages is NULL",
        ),
        ("score_invalid_utf8", "R3_ERR_INVALID_UTF8", "passages[0]"),
        ("score_null_model", "R3_ERR_NULL_POINTER", "model is NULL"),
    ];
    assert_eq!(bad.len(), expect.len(), "cases: {:?}", bad.keys());
    for (case, status, needle) in expect {
        let (got, msg) = bad
            .get(case)
            .unwrap_or_else(|| panic!("case {case} missing"));
        assert_eq!(*got, status, "{case}: {msg}");
        assert!(
            msg.contains(needle),
            "{case}: {msg:?} should mention {needle:?}"
        );
    }
    assert!(records("threads").iter().any(|r| r == &["ok"]));
    assert_eq!(records("version"), vec![vec![env!("CARGO_PKG_VERSION")]]);
}

/// Extract the first ```c block after `heading` in a Markdown file, compile it against the
/// static library, run it from the repository root, and return its stdout.
fn run_markdown_c_example(file: &str, heading: &str, tag: &str) -> String {
    let md = std::fs::read_to_string(manifest().join(file)).unwrap();
    let section = md
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("{file} has a `{heading}` section"));
    let code = section
        .split("```c\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .unwrap_or_else(|| panic!("{file} `{heading}` has a ```c block"));
    let src = scratch_dir(&format!("{tag}-src")).join(format!("{tag}.c"));
    std::fs::write(&src, code).unwrap();
    let exe = build_c_program(&src, tag);
    let out = Command::new(&exe).current_dir(manifest()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{file} example failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
    let _ = std::fs::remove_dir_all(src.parent().unwrap());
    stdout
}

#[test]
fn readme_c_example_compiles_and_runs_as_written() {
    let stdout = run_markdown_c_example("README.md", "## C API", "readme_example");
    assert!(stdout.starts_with("2 vectors of 32 floats"), "{stdout}");
    let code_lines = std::fs::read_to_string(manifest().join("README.md"))
        .unwrap()
        .split("\n## C API\n")
        .nth(1)
        .and_then(|s| s.split("```c\n").nth(1))
        .map(|s| s.split("\n```").next().unwrap().lines().count())
        .unwrap();
    assert!(
        code_lines <= 20,
        "README example should stay short: {code_lines} lines"
    );
}

#[test]
fn docs_c_example_compiles_and_runs_as_written() {
    let stdout = run_markdown_c_example("docs/c-api.md", "## Example", "docs_example");
    assert!(stdout.starts_with("dense "), "{stdout}");
}

// ---- The header against the Rust sources -------------------------------------------------------

/// Split `text` into `;`-terminated statements at brace depth 0.
fn statements(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for ch in text.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ';' if depth == 0 => {
                out.push(cur.split_whitespace().collect::<Vec<_>>().join(" "));
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    assert!(cur.trim().is_empty(), "trailing text without ';': {cur}");
    out
}

fn strip_c_comments(src: &str) -> String {
    let mut s = String::new();
    let mut rest = src;
    while let Some(i) = rest.find("/*") {
        s.push_str(&rest[..i]);
        let end = rest[i..].find("*/").expect("unterminated comment");
        rest = &rest[i + end + 2..];
    }
    s.push_str(rest);
    s.lines()
        .map(|l| l.split("//").next().unwrap())
        .filter(|l| {
            let t = l.trim();
            !t.starts_with('#') && t != "extern \"C\" {" && t != "}"
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Tokens of a C declaration: identifiers, `*`, `[N]` kept whole.
fn c_tokens(decl: &str) -> Vec<String> {
    decl.replace('*', " * ")
        .replace('[', " [")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A canonical spelling of a C type from its tokens: east const (`char const* const*`), typedefs
/// of scalars resolved.
fn c_canon(tokens: &[String], typedefs: &BTreeMap<String, String>) -> String {
    let mut t: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let leading_const = t.first() == Some(&"const");
    if leading_const {
        t.remove(0);
    }
    let base = t[0];
    let mut s = typedefs.get(base).cloned().unwrap_or(base.to_string());
    if leading_const {
        s.push_str(" const");
    }
    for tok in &t[1..] {
        match *tok {
            "const" => s.push_str(" const"),
            "*" => s.push('*'),
            other => panic!("unexpected token {other:?} in C type {tokens:?}"),
        }
    }
    s
}

/// Split `type name` (or `type name[N]`) into (name, canonical type).
fn c_decl(decl: &str, typedefs: &BTreeMap<String, String>) -> (String, String) {
    let mut toks = c_tokens(decl);
    let array = toks.last().filter(|t| t.starts_with('[')).cloned();
    if array.is_some() {
        toks.pop();
    }
    let name = toks.pop().expect("declaration has a name");
    (
        name,
        c_canon(&toks, typedefs) + array.as_deref().unwrap_or(""),
    )
}

#[derive(Debug, Default)]
struct Api {
    /// name -> (return type, [(param name, type)])
    functions: BTreeMap<String, (String, Vec<(String, String)>)>,
    /// struct name -> [(field name, type)]
    structs: BTreeMap<String, Vec<(String, String)>>,
    /// constant name -> value
    constants: BTreeMap<String, i64>,
    opaque: BTreeSet<String>,
}

fn parse_header(src: &str) -> (Api, String) {
    let version = src
        .lines()
        .find_map(|l| l.strip_prefix("#define R3_VERSION "))
        .expect("#define R3_VERSION")
        .trim()
        .trim_matches('"')
        .to_string();
    let mut api = Api::default();
    let mut typedefs = BTreeMap::new();
    for st in statements(&strip_c_comments(src)) {
        if let Some(body) = st.strip_prefix("enum {") {
            for entry in body.trim_end_matches('}').split(',') {
                let (name, value) = entry.split_once('=').expect("enum entries have values");
                api.constants
                    .insert(name.trim().into(), value.trim().parse().unwrap());
            }
        } else if let Some(rest) = st.strip_prefix("typedef struct ") {
            match rest.split_once('{') {
                Some((name, body)) => {
                    let (fields, alias) = body.rsplit_once('}').unwrap();
                    assert_eq!(name.trim(), alias.trim(), "typedef struct name");
                    let fields = fields
                        .split(';')
                        .filter(|f| !f.trim().is_empty())
                        .map(|f| c_decl(f, &typedefs))
                        .collect();
                    api.structs.insert(name.trim().into(), fields);
                }
                None => {
                    let (name, alias) = rest.split_once(' ').unwrap();
                    assert_eq!(name, alias, "opaque typedef name");
                    api.opaque.insert(name.into());
                }
            }
        } else if let Some(rest) = st.strip_prefix("typedef ") {
            let toks = c_tokens(rest);
            let (alias, ty) = toks.split_last().unwrap();
            typedefs.insert(alias.clone(), c_canon(ty, &typedefs));
        } else {
            let (head, params) = st.split_once('(').expect("a prototype");
            let (name, ret) = c_decl(head, &typedefs);
            let params = params
                .trim()
                .strip_suffix(')')
                .expect("prototype ends with )");
            let params = if params.trim() == "void" {
                Vec::new()
            } else {
                params.split(',').map(|p| c_decl(p, &typedefs)).collect()
            };
            api.functions.insert(name, (ret, params));
        }
    }
    (api, version)
}

/// `EncodeOptions` -> `encode_options`; with `upper`, `NullPointer` -> `NULL_POINTER`.
fn snake(camel: &str, upper: bool) -> String {
    let mut s = String::new();
    let mut prev_lower = false;
    for c in camel.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            s.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        s.push(if upper {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        });
    }
    s
}

/// The C spelling (canonical, as [`c_canon`]) of a Rust FFI type.
fn rust_to_c(ty: &str) -> String {
    let ty = ty.trim();
    if let Some(inner) = ty.strip_prefix("*const ") {
        return format!("{} const*", rust_to_c(inner));
    }
    if let Some(inner) = ty.strip_prefix("*mut ") {
        return format!("{}*", rust_to_c(inner));
    }
    if let Some(arr) = ty.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        let (elem, n) = arr.split_once(';').unwrap();
        return format!("{}[{}]", rust_to_c(elem), n.trim());
    }
    match ty {
        "" | "()" => "void".into(),
        "c_char" => "char".into(),
        "usize" => "size_t".into(),
        "f32" => "float".into(),
        "u32" => "uint32_t".into(),
        "i32" | "R3Status" => "int32_t".into(),
        other => match other.strip_prefix("R3") {
            Some(name) => format!("r3_{}", snake(name, false)),
            None => panic!("no C spelling for Rust type {other:?}"),
        },
    }
}

fn strip_rust_comments(src: &str) -> String {
    src.lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn between(s: &str, open: char, close: char) -> (&str, &str) {
    let start = s.find(open).unwrap() + 1;
    let end = start + s[start..].find(close).unwrap();
    (&s[start..end], &s[end + 1..])
}

fn parse_rust(src: &str) -> Api {
    let src = strip_rust_comments(src);
    let mut api = Api::default();
    for chunk in src.split("extern \"C\" fn ").skip(1) {
        let name = chunk[..chunk.find('(').unwrap()].trim().to_string();
        let (params, rest) = between(chunk, '(', ')');
        let ret = rest[..rest.find('{').unwrap()]
            .trim()
            .trim_start_matches("->")
            .trim();
        let params = params
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (n, t) = p.split_once(':').unwrap();
                (n.trim().to_string(), rust_to_c(t))
            })
            .collect();
        api.functions.insert(name, (rust_to_c(ret), params));
    }
    for chunk in src.split("#[repr(C)]").skip(1) {
        let decl = &chunk[chunk.find("pub struct ").unwrap() + "pub struct ".len()..];
        let name = decl[..decl.find('{').unwrap()].trim();
        let (body, _) = between(decl, '{', '}');
        let fields = body
            .split(',')
            .filter(|f| !f.trim().is_empty())
            .map(|f| {
                let (n, t) = f.trim().trim_start_matches("pub ").split_once(':').unwrap();
                (n.trim().to_string(), rust_to_c(t))
            })
            .collect();
        api.structs.insert(rust_to_c(name), fields);
    }
    for line in src.lines() {
        if let Some(rest) = line.trim().strip_prefix("pub const R3_") {
            let (name, value) = rest.split_once(": i32 =").unwrap();
            let value = value.trim().trim_end_matches(';').parse().unwrap();
            api.constants.insert(format!("R3_{name}"), value);
        }
    }
    if let Some(chunk) = src.split("pub enum R3Status").nth(1) {
        let (body, _) = between(chunk, '{', '}');
        for entry in body.split(',').filter(|e| !e.trim().is_empty()) {
            let (variant, value) = entry.split_once('=').unwrap();
            let variant = variant.trim();
            let c_name = if variant == "Ok" {
                "R3_OK".to_string()
            } else {
                format!("R3_ERR_{}", snake(variant, true))
            };
            api.constants.insert(c_name, value.trim().parse().unwrap());
        }
    }
    api
}

fn rust_capi_sources() -> String {
    let dir = manifest().join("src/capi");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn header_matches_the_rust_signatures() {
    let header = std::fs::read_to_string(manifest().join("include/retrom3.h")).unwrap();
    let (c, version) = parse_header(&header);
    let rust = parse_rust(&rust_capi_sources());

    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "R3_VERSION in the header"
    );
    let c_names: BTreeSet<_> = c.functions.keys().collect();
    let rust_names: BTreeSet<_> = rust.functions.keys().collect();
    assert_eq!(c_names, rust_names, "functions: header vs src/capi");
    assert!(c.functions.len() >= 14, "{:?}", c.functions.keys());
    for (name, sig) in &rust.functions {
        assert_eq!(
            &c.functions[name], sig,
            "signature of {name} (return, params)"
        );
    }
    assert_eq!(c.structs, rust.structs, "repr(C) structs");
    assert_eq!(c.constants, rust.constants, "constants");
    assert_eq!(
        c.opaque,
        BTreeSet::from(["r3_model".to_string(), "r3_output".to_string()]),
        "opaque handles"
    );
}

#[test]
fn header_parser_sees_types_as_c_does() {
    let td = BTreeMap::from([("r3_status".to_string(), "int32_t".to_string())]);
    assert_eq!(
        c_decl("const char* const* texts", &td),
        ("texts".into(), "char const* const*".into())
    );
    assert_eq!(rust_to_c("*const *const c_char"), "char const* const*");
    assert_eq!(
        c_decl("r3_model** out", &td).1,
        rust_to_c("*mut *mut R3Model")
    );
    assert_eq!(c_decl("r3_status s", &td).1, rust_to_c("R3Status"));
    assert_eq!(c_decl("float weights[3]", &td).1, rust_to_c("[f32; 3]"));
    assert_ne!(c_decl("const float** d", &td).1, rust_to_c("*mut *mut f32"));
}

// ---- The extern functions called from Rust -----------------------------------------------------

fn last_error() -> String {
    // SAFETY: r3_last_error never returns NULL and the string lives until the next r3_ call.
    unsafe { CStr::from_ptr(r3_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn cstring(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn load(dir: &Path) -> (R3Status, *mut R3Model) {
    let dir = cstring(dir.to_str().unwrap());
    let mut m = ptr::null_mut();
    // SAFETY: valid NUL-terminated strings and a writable out-pointer.
    let s = unsafe { r3_model_load(dir.as_ptr(), c"cpu".as_ptr(), &mut m) };
    (s, m)
}

fn expect(status: R3Status, want: R3Status, needle: &str) {
    let msg = last_error();
    assert_eq!(status, want, "{msg}");
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

#[test]
fn rust_bad_inputs_through_the_abi() {
    let mut m = ptr::null_mut();
    // SAFETY (this block): every pointer passed is NULL, a valid NUL-terminated string, a
    // writable out-pointer, or a live handle, as each call's contract allows.
    unsafe {
        expect(
            r3_model_load(ptr::null(), ptr::null(), &mut m),
            R3Status::NullPointer,
            "dir is NULL",
        );
        let dir = cstring(fixture("tiny-xlmr").to_str().unwrap());
        expect(
            r3_model_load(dir.as_ptr(), ptr::null(), ptr::null_mut()),
            R3Status::NullPointer,
            "out is NULL",
        );
        let bad = CString::new(vec![b't', 0xff, 0xfe]).unwrap();
        expect(
            r3_model_load(bad.as_ptr(), ptr::null(), &mut m),
            R3Status::InvalidUtf8,
            "offset 1",
        );
        expect(
            r3_model_load(dir.as_ptr(), c"gpu".as_ptr(), &mut m),
            R3Status::InvalidArgument,
            "unknown device",
        );
        assert!(m.is_null());
    }
    let (s, m) = load(Path::new("/nonexistent/retrom3"));
    expect(s, R3Status::Io, "/nonexistent/retrom3");
    assert!(m.is_null());
    // The message stays one line when it echoes a path with a line break in it.
    let (s, _) = load(Path::new("/nonexistent\nINJECTED line"));
    expect(s, R3Status::Io, "/nonexistent\\nINJECTED line");
    assert!(!last_error().contains('\n'), "{:?}", last_error());

    // A plain BERT without the M3 heads: sparse and scores are refused with a clear reason.
    let (s, bert) = load(&fixture("tiny-bert"));
    assert_eq!(s, R3Status::Ok, "{}", last_error());
    let texts = [c"a text".as_ptr()];
    let mut out = ptr::null_mut();
    let opts = R3EncodeOptions {
        sparse: 1,
        ..Default::default()
    };
    let mut out5 = [0f32; 5];
    // SAFETY: a live handle, one valid string, valid options and out-pointers.
    unsafe {
        expect(
            r3_encode(bert, texts.as_ptr(), 1, &opts, &mut out),
            R3Status::InvalidArgument,
            "M3 heads",
        );
        expect(
            r3_score(
                bert,
                texts.as_ptr(),
                texts.as_ptr(),
                1,
                ptr::null(),
                out5.as_mut_ptr(),
            ),
            R3Status::InvalidArgument,
            "M3 heads",
        );
        r3_model_free(bert);
    }

    let (s, model) = load(&fixture("tiny-xlmr"));
    assert_eq!(s, R3Status::Ok);
    assert_eq!(last_error(), "", "a success clears the message");
    let bad_text = CString::new(vec![b'o', b'k', 0xc3, 0x28]).unwrap();
    let mixed = [c"fine".as_ptr(), bad_text.as_ptr()];
    let with_null = [c"fine".as_ptr(), ptr::null()];
    // SAFETY: a live handle; arrays of valid pointers or NULLs with the given lengths.
    unsafe {
        expect(
            r3_encode(model, mixed.as_ptr(), 2, ptr::null(), &mut out),
            R3Status::InvalidUtf8,
            "texts[1] is not valid UTF-8 (invalid byte at offset 2)",
        );
        expect(
            r3_encode(model, with_null.as_ptr(), 2, ptr::null(), &mut out),
            R3Status::NullPointer,
            "texts[1] is NULL",
        );
        expect(
            r3_encode(ptr::null(), mixed.as_ptr(), 1, ptr::null(), &mut out),
            R3Status::NullPointer,
            "model is NULL",
        );
        let none = R3EncodeOptions {
            dense: 0,
            ..Default::default()
        };
        expect(
            r3_encode(model, mixed.as_ptr(), 1, &none, &mut out),
            R3Status::InvalidArgument,
            "nothing requested",
        );
        let bad_norm = R3EncodeOptions {
            normalize: -1,
            ..Default::default()
        };
        expect(
            r3_encode(model, mixed.as_ptr(), 1, &bad_norm, &mut out),
            R3Status::InvalidArgument,
            "normalize -1",
        );
        assert!(out.is_null());

        assert_eq!(
            r3_encode(model, mixed.as_ptr(), 1, ptr::null(), &mut out),
            R3Status::Ok
        );
        let (mut ids, mut w, mut len) = (ptr::null(), ptr::null(), 0usize);
        expect(
            r3_output_sparse(out, 0, &mut ids, &mut w, &mut len),
            R3Status::NotRequested,
            "sparse was not requested",
        );
        let mut dim = 0usize;
        expect(
            r3_output_dense(out, ptr::null_mut(), &mut len, &mut dim),
            R3Status::NullPointer,
            "out-pointer",
        );
        r3_output_free(out);

        let zero = R3ScoreOptions {
            weights: [0.0; 3],
            ..Default::default()
        };
        out5 = [-1.0; 5];
        expect(
            r3_score(
                model,
                mixed.as_ptr(),
                mixed.as_ptr(),
                1,
                &zero,
                out5.as_mut_ptr(),
            ),
            R3Status::InvalidArgument,
            "r3_score_options_init",
        );
        expect(
            r3_score(
                model,
                mixed.as_ptr(),
                mixed.as_ptr(),
                2,
                ptr::null(),
                out5.as_mut_ptr(),
            ),
            R3Status::InvalidUtf8,
            "queries[1]",
        );
        assert_eq!(out5, [-1.0; 5], "out5 untouched on failure");
        r3_model_free(model);
        r3_model_free(ptr::null_mut());
        r3_output_free(ptr::null_mut());

        let name = |s: i32| CStr::from_ptr(r3_status_name(s)).to_str().unwrap();
        assert_eq!(name(R3Status::OutOfRange as i32), "R3_ERR_OUT_OF_RANGE");
        assert_eq!(name(-3), "R3_UNKNOWN_STATUS");
        assert_eq!(
            CStr::from_ptr(r3_version()).to_str().unwrap(),
            env!("CARGO_PKG_VERSION")
        );
    }
}

#[test]
fn rust_round_trip_through_the_abi_matches_the_rust_api() {
    let texts = ["What is BGE M3?", "Defination of BM25", "北京"];
    let c_texts: Vec<CString> = texts.iter().map(|t| cstring(t)).collect();
    let ptrs: Vec<*const c_char> = c_texts.iter().map(|c| c.as_ptr()).collect();
    let want = tiny_model().encode(&texts, &EncodeOptions::all()).unwrap();
    let (s, model) = load(&fixture("tiny-xlmr"));
    assert_eq!(s, R3Status::Ok);
    let mut opts = R3EncodeOptions::default();
    // SAFETY: a writable options struct.
    assert_eq!(unsafe { r3_encode_options_init(&mut opts) }, R3Status::Ok);
    opts.sparse = 1;
    opts.colbert = 1;
    let mut out = ptr::null_mut();
    // SAFETY (this block): a live model and output, valid arrays of `texts.len()` strings, and
    // accessor results read only within the lengths they return, before r3_output_free.
    unsafe {
        assert_eq!(
            r3_encode(model, ptrs.as_ptr(), ptrs.len(), &opts, &mut out),
            R3Status::Ok
        );
        let (mut data, mut n, mut dim) = (ptr::null(), 0usize, 0usize);
        assert_eq!(
            r3_output_dense(out, &mut data, &mut n, &mut dim),
            R3Status::Ok
        );
        let dense = std::slice::from_raw_parts(data, n * dim);
        assert_close_slices("dense", dense, &want.dense.as_ref().unwrap().concat());
        for i in 0..texts.len() {
            let (mut ids, mut w, mut len) = (ptr::null(), ptr::null(), 0usize);
            assert_eq!(
                r3_output_sparse(out, i, &mut ids, &mut w, &mut len),
                R3Status::Ok
            );
            let lw = &want.sparse.as_ref().unwrap()[i];
            let ids = std::slice::from_raw_parts(ids, len);
            let w = std::slice::from_raw_parts(w, len);
            assert_eq!(ids, lw.iter().map(|e| e.0).collect::<Vec<_>>().as_slice());
            assert_close_slices("sparse", w, &lw.iter().map(|e| e.1).collect::<Vec<_>>());
            let (mut cb, mut count) = (ptr::null(), 0usize);
            assert_eq!(
                r3_output_colbert(out, i, &mut cb, &mut count, &mut dim),
                R3Status::Ok
            );
            let cv = &want.colbert.as_ref().unwrap()[i];
            assert_eq!(count, cv.len());
            assert_close_slices(
                "colbert",
                std::slice::from_raw_parts(cb, count * dim),
                &cv.concat(),
            );
        }
        let mut cb = ptr::null();
        expect(
            r3_output_colbert(out, texts.len(), &mut cb, &mut n, &mut dim),
            R3Status::OutOfRange,
            "text index 3 out of range",
        );
        r3_output_free(out);

        let mut so = R3ScoreOptions::default();
        assert_eq!(r3_score_options_init(&mut so), R3Status::Ok);
        assert_eq!(so.weights, ScoreOptions::default().weights);
        let mut out5 = vec![0f32; 5 * texts.len()];
        assert_eq!(
            r3_score(
                model,
                ptrs.as_ptr(),
                ptrs.as_ptr(),
                texts.len(),
                &so,
                out5.as_mut_ptr()
            ),
            R3Status::Ok
        );
        let pairs: Vec<(&str, &str)> = texts.iter().map(|t| (*t, *t)).collect();
        let m = tiny_model();
        let ropts = ScoreOptions {
            max_query_length: Some(m.max_length),
            max_passage_length: Some(m.max_length),
            ..Default::default()
        };
        let want: Vec<f32> = m
            .compute_score(&pairs, &ropts)
            .unwrap()
            .iter()
            .flat_map(|s| {
                [
                    s.dense,
                    s.sparse,
                    s.colbert,
                    s.sparse_dense,
                    s.colbert_sparse_dense,
                ]
            })
            .collect();
        assert_close_slices("scores", &out5, &want);
        r3_model_free(model);
    }
}
