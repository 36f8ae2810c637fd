//! `.r3tok` corpora: `tokenize_corpus` against the tokenizer (plain and packed), input detection
//! and line errors against `jsonl::read_texts`, resume after interruptions (byte-identical
//! output), refusal of mismatched partial files, and `TokenCorpus::open` on every truncation and
//! byte flip of a small file (an error, never a panic). Ends with `retrom3 tokenize` smoke tests.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use retrom3::data::corpus::format::HEADER_LEN;
use retrom3::data::corpus::{
    tokenize_corpus, tokenizer_fingerprint, TokenCorpus, TokenizeOptions, TokenizeStats,
};
use retrom3::data::jsonl::read_texts;
use retrom3::data::TextTokenizer;
use retrom3::{Error, Result};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(fixture("tiny-xlmr")).unwrap()
}

/// A fresh empty directory, unique per call (tests run in parallel).
fn tmpdir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("retrom3-corpus-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts(max_len: usize, pack: bool, batch: usize) -> TokenizeOptions {
    TokenizeOptions {
        max_len,
        pack,
        batch,
        checkpoint_every: 1,
    }
}

fn run(
    tok: &TextTokenizer,
    input: &Path,
    output: &Path,
    o: &TokenizeOptions,
) -> Result<TokenizeStats> {
    tokenize_corpus(tok, input, output, o, &mut |_| {})
}

/// Deterministic multilingual texts of varied lengths (1 to ~120 words), with empty and
/// whitespace-only ones mixed in.
fn texts(n: usize, seed: u64) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "quick",
        "brown",
        "fox",
        "retrieval",
        "embedding",
        "model",
        "dense",
        "sparse",
        "Größe",
        "Bäume",
        "Jürgen",
        "北京",
        "是",
        "中国的首都",
        "multi-vector",
        "BM25,",
        "ranks",
        "documents.",
        "Überraschung!",
        "interaction",
        "lexical",
        "matching",
        "(M3)",
        "x",
    ];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|_| match next() % 17 {
            0 => String::new(),
            1 => "   \t ".to_string(),
            k => {
                let len = if k == 2 {
                    60 + next() % 60
                } else {
                    1 + next() % 20
                };
                (0..len)
                    .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        })
        .collect()
}

fn write_jsonl(path: &Path, texts: &[String]) {
    let mut s = String::new();
    for t in texts {
        s.push_str(&serde_json::json!({ "id": 7, "text": t }).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// The content ids of `text` as `TextTokenizer::encode` gives them (specials stripped).
fn content(tok: &TextTokenizer, text: &str, max_len: usize) -> Vec<u32> {
    let ids = tok.encode(text, max_len).unwrap();
    assert_eq!(ids.first().copied(), tok.cls_id());
    assert_eq!(ids.last().copied(), tok.eos_id());
    ids[1..ids.len() - 1].to_vec()
}

/// The documents `tokenize_corpus` must write for `input` without packing: `read_texts`'
/// non-blank texts that give at least one token, each truncated to max_len - 2.
fn expected_docs(tok: &TextTokenizer, input: &Path, max_len: usize) -> Vec<Vec<u32>> {
    read_texts(input)
        .unwrap()
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| content(tok, t, max_len))
        .filter(|d| !d.is_empty())
        .collect()
}

fn docs(c: &TokenCorpus) -> Vec<Vec<u32>> {
    (0..c.len()).map(|i| c.doc(i).to_vec()).collect()
}

#[test]
fn documents_equal_the_tokenizer_without_specials_truncated() {
    let tok = tokenizer();
    let d = tmpdir("roundtrip");
    let mut all = texts(300, 1);
    all.extend(read_texts(&fixture("texts.jsonl")).unwrap());
    let input = d.join("in.jsonl");
    write_jsonl(&input, &all);
    for max_len in [3, 8, 16, 512] {
        let output = d.join(format!("out{max_len}.r3tok"));
        let stats = run(&tok, &input, &output, &opts(max_len, false, 37)).unwrap();
        let c = TokenCorpus::open(&output).unwrap();
        c.verify_tokens().unwrap();
        let want = expected_docs(&tok, &input, max_len);
        assert_eq!(docs(&c), want, "max_len {max_len}");
        assert!(c.iter().eq(want.iter().map(Vec::as_slice)));

        let blank = all.iter().filter(|t| t.trim().is_empty()).count() as u64;
        assert!(blank > 10);
        assert_eq!(stats.lines, all.len() as u64);
        assert_eq!(stats.skipped_empty, blank);
        assert_eq!(stats.texts, all.len() as u64 - blank);
        assert_eq!(stats.docs, want.len() as u64);
        assert_eq!(c.len() as u64, stats.docs);
        assert_eq!(c.n_tokens(), stats.tokens);
        assert_eq!(
            c.n_tokens(),
            want.iter().map(|d| d.len() as u64).sum::<u64>()
        );
        let full: u64 = all
            .iter()
            .filter(|t| !t.trim().is_empty())
            .map(|t| content(&tok, t, 100_000).len() as u64)
            .sum();
        assert_eq!(stats.tokens + stats.dropped_tokens, full);
        assert!(stats.truncated > 0 || max_len == 512);
        assert_eq!(stats.input_bytes, std::fs::metadata(&input).unwrap().len());
        assert_eq!(stats.resumed_at, None);

        assert_eq!(c.max_len(), max_len);
        assert!(!c.is_packed());
        assert!(!c.is_empty());
        assert_eq!(c.vocab_size(), tok.vocab_size());
        assert_eq!(c.fingerprint(), tokenizer_fingerprint(&tok).unwrap());
        assert!(c.get(c.len()).is_none());
        assert_eq!(c.offsets().len(), c.len() + 1);
        // No working file is left behind.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn input_detection_and_line_rules_follow_read_texts() {
    let tok = tokenizer();
    let d = tmpdir("detect");
    let cases: &[(&str, &[u8])] = &[
        // Plain text: leading blank lines are empty texts, CRLF, BOM, no final newline.
        ("plain.txt", b"\xEF\xBB\xBF\n  \nfirst line\r\n\nsecond \xC3\xA9 line\nthird"),
        // A plain file whose later lines look like JSON stays plain.
        ("plain2.txt", b"hello\n{\"text\": \"not json mode\"}\n"),
        // JSONL with a BOM, CRLF, other fields, trailing blank lines.
        (
            "bom.jsonl",
            b"\xEF\xBB\xBF{\"text\": \"a b c\", \"x\": [1]}\r\n {\"text\": \"\"}\n{\"text\": \"d\"}\n\n  \n",
        ),
        ("blank-only.txt", b"\n \n\t\n"),
        ("empty.txt", b""),
    ];
    for (name, bytes) in cases {
        let input = d.join(name);
        std::fs::write(&input, bytes).unwrap();
        let output = d.join(format!("{name}.r3tok"));
        let stats = run(&tok, &input, &output, &opts(64, false, 2)).unwrap();
        let c = TokenCorpus::open(&output).unwrap();
        assert_eq!(docs(&c), expected_docs(&tok, &input, 64), "{name}");
        let texts = read_texts(&input).unwrap();
        let blank = texts.iter().filter(|t| t.trim().is_empty()).count() as u64;
        assert_eq!(stats.skipped_empty, blank, "{name}");
        assert_eq!(
            stats.texts + stats.skipped_empty,
            texts.len() as u64,
            "{name}"
        );
    }
    let c = TokenCorpus::open(d.join("empty.txt.r3tok")).unwrap();
    assert!(c.is_empty());
    assert_eq!(c.n_tokens(), 0);
    assert_eq!(c.offsets(), &[0]);
    assert!(c.iter().next().is_none());
}

#[test]
fn packing_fills_blocks_in_order_and_conserves_tokens() {
    let tok = tokenizer();
    let d = tmpdir("pack");
    let all = texts(250, 2);
    let input = d.join("in.jsonl");
    write_jsonl(&input, &all);
    let stream: Vec<u32> = all
        .iter()
        .filter(|t| !t.trim().is_empty())
        .flat_map(|t| content(&tok, t, 1_000_000))
        .collect();
    for max_len in [3, 10, 64, 509] {
        let output = d.join(format!("packed{max_len}.r3tok"));
        let stats = run(&tok, &input, &output, &opts(max_len, true, 16)).unwrap();
        let c = TokenCorpus::open(&output).unwrap();
        c.verify_tokens().unwrap();
        assert!(c.is_packed());
        let cap = max_len - 2;
        // Order preserved and nothing lost: the blocks concatenate to the token stream.
        assert_eq!(c.tokens(), &stream[..]);
        assert_eq!(c.n_tokens(), stream.len() as u64);
        assert_eq!(stats.tokens, stream.len() as u64);
        assert_eq!(stats.dropped_tokens, 0);
        assert_eq!(stats.truncated, 0);
        // Every block full except the last.
        assert_eq!(c.len(), stream.len().div_ceil(cap));
        for (i, block) in c.iter().enumerate() {
            assert_eq!(block, &stream[i * cap..((i + 1) * cap).min(stream.len())]);
            if i + 1 < c.len() {
                assert_eq!(block.len(), cap);
            }
        }
    }
}

#[test]
fn batch_size_does_not_change_the_file() {
    let tok = tokenizer();
    let d = tmpdir("batch");
    let input = d.join("in.txt");
    std::fs::write(&input, texts(120, 3).join("\n")).unwrap();
    for pack in [false, true] {
        let reference = d.join("ref.r3tok");
        run(&tok, &input, &reference, &opts(12, pack, 1024)).unwrap();
        let want = std::fs::read(&reference).unwrap();
        for batch in [1, 2, 7, 119, 120, 121] {
            let out = d.join(format!("b{batch}.r3tok"));
            run(&tok, &input, &out, &opts(12, pack, batch)).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == want,
                "batch {batch} pack {pack}"
            );
        }
    }
}

const CRASH: &str = "simulated crash";

/// Keeps the default panic report for everything but our simulated crashes (the hook is global
/// to the test process, hence installed once and delegating).
fn quiet_simulated_crashes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&CRASH) {
                default(info);
            }
        }));
    });
}

/// Runs `tokenize_corpus` and panics inside its progress callback at call `k` (call 0 reports
/// the starting position, call j >= 1 follows batch j), as a crash would stop it. Returns whether
/// the run was interrupted (false: it finished before call `k`).
fn interrupted_run(
    tok: &TextTokenizer,
    input: &Path,
    output: &Path,
    o: &TokenizeOptions,
    k: usize,
) -> bool {
    quiet_simulated_crashes();
    let mut calls = 0usize;
    let r = catch_unwind(AssertUnwindSafe(|| {
        tokenize_corpus(tok, input, output, o, &mut |_| {
            if calls == k {
                std::panic::panic_any(CRASH);
            }
            calls += 1;
        })
    }));
    match r {
        Err(_) => true,
        Ok(res) => {
            res.unwrap();
            false
        }
    }
}

fn partial(output: &Path, suffix: &str) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[test]
fn resume_after_interruptions_is_byte_identical() {
    let tok = tokenizer();
    let d = tmpdir("resume");
    let input = d.join("in.jsonl");
    let all = texts(400, 4);
    let nonblank = all.iter().filter(|t| !t.trim().is_empty()).count();
    write_jsonl(&input, &all);
    for pack in [false, true] {
        for checkpoint_every in [1, 3] {
            let o = TokenizeOptions {
                max_len: 24,
                pack,
                batch: 16,
                checkpoint_every,
            };
            let reference = d.join("ref.r3tok");
            let want_stats = run(&tok, &input, &reference, &o).unwrap();
            let want = std::fs::read(&reference).unwrap();
            // Progress calls: 0 at the start, then one per batch of 16 non-blank texts, the
            // last batch being the short (maybe empty) one that meets the end of the file.
            let batches = nonblank / 16 + 1;
            for k in [1, 2, 4, 5, 11, batches - 1, batches] {
                let out = d.join(format!("out-{pack}-{checkpoint_every}-{k}.r3tok"));
                assert!(interrupted_run(&tok, &input, &out, &o, k), "k {k}");
                assert!(!out.exists());
                let state = partial(&out, ".partial.state");
                // The state exists once a checkpoint was passed.
                assert_eq!(state.exists(), k > checkpoint_every, "k {k}");
                // A second crash during the resumed run, then a clean finish.
                interrupted_run(&tok, &input, &out, &o, 3);
                let mut first = None;
                let stats = tokenize_corpus(&tok, &input, &out, &o, &mut |b| {
                    first.get_or_insert(b);
                })
                .unwrap();
                assert!(
                    std::fs::read(&out).unwrap() == want,
                    "pack {pack} every {checkpoint_every} k {k}"
                );
                assert_eq!(stats.resumed_at, first.filter(|&b| b > 0));
                assert_eq!(
                    TokenizeStats {
                        resumed_at: None,
                        ..stats
                    },
                    want_stats
                );
                for suffix in [".partial", ".partial.offsets", ".partial.state"] {
                    assert!(!partial(&out, suffix).exists(), "{suffix} left");
                }
            }
        }
    }
}

#[test]
fn resume_with_other_arguments_is_refused() {
    let tok = tokenizer();
    let d = tmpdir("mismatch");
    let input = d.join("in.txt");
    std::fs::write(&input, texts(200, 5).join("\n")).unwrap();
    let other = d.join("other.txt");
    std::fs::write(&other, texts(200, 6).join("\n")).unwrap();
    let out = d.join("out.r3tok");
    let o = opts(16, false, 8);
    assert!(interrupted_run(&tok, &input, &out, &o, 5));

    let refused = |r: Result<TokenizeStats>, what: &str| match r {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains(what), "{msg}");
            assert!(msg.contains("delete"), "{msg}");
            assert!(msg.contains("out.r3tok.partial.state"), "{msg}");
        }
        other => panic!("expected a refusal naming {what}, got {other:?}"),
    };
    refused(run(&tok, &input, &out, &opts(17, false, 8)), "max_len");
    refused(run(&tok, &input, &out, &opts(16, true, 8)), "pack");
    refused(run(&tok, &other, &out, &o), "input");
    let bert = TextTokenizer::from_dir(fixture("tiny-bert")).unwrap();
    refused(run(&bert, &input, &out, &o), "tokenizer");
    // A changed input (size / modification time) is another input.
    let mut changed = std::fs::read(&input).unwrap();
    changed.extend_from_slice(b"\none more line\n");
    std::fs::write(&input, &changed).unwrap();
    refused(run(&tok, &input, &out, &o), "input file");

    // Another batch size is fine (it never changes the output) ...
    let out2 = d.join("out2.r3tok");
    let reference = d.join("ref2.r3tok");
    run(&tok, &input, &reference, &o).unwrap();
    assert!(interrupted_run(&tok, &input, &out2, &o, 4));
    run(&tok, &input, &out2, &opts(16, false, 5)).unwrap();
    assert!(std::fs::read(&out2).unwrap() == std::fs::read(&reference).unwrap());

    // ... and deleting the partial files starts over.
    for suffix in [".partial", ".partial.offsets", ".partial.state"] {
        std::fs::remove_file(partial(&out, suffix)).unwrap();
    }
    run(&tok, &input, &out, &o).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap());
}

#[test]
fn damaged_partial_files_are_errors() {
    let tok = tokenizer();
    let d = tmpdir("damaged");
    let input = d.join("in.txt");
    std::fs::write(&input, texts(200, 7).join("\n")).unwrap();
    let o = opts(16, false, 8);

    // A garbled state file.
    let out = d.join("a.r3tok");
    assert!(interrupted_run(&tok, &input, &out, &o, 6));
    std::fs::write(partial(&out, ".partial.state"), b"{\"format\": ").unwrap();
    match run(&tok, &input, &out, &o) {
        Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("delete"), "{e}"),
        other => panic!("{other:?}"),
    }

    // A data file shorter than the state says.
    let out = d.join("b.r3tok");
    assert!(interrupted_run(&tok, &input, &out, &o, 6));
    let p = partial(&out, ".partial");
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_len(HEADER_LEN as u64 + 4).unwrap();
    match run(&tok, &input, &out, &o) {
        Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("shorter"), "{e}"),
        other => panic!("{other:?}"),
    }

    // A token id changed inside the checkpointed part of the data file.
    let out = d.join("e.r3tok");
    assert!(interrupted_run(&tok, &input, &out, &o, 6));
    let p = partial(&out, ".partial");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[HEADER_LEN] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    match run(&tok, &input, &out, &o) {
        Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("checksum"), "{e}"),
        other => panic!("{other:?}"),
    }

    // An offset changed inside the checkpointed part of the offsets file (a document boundary
    // moved by one token): the offsets checksum.
    let out = d.join("f.r3tok");
    assert!(interrupted_run(&tok, &input, &out, &o, 6));
    let p = partial(&out, ".partial.offsets");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[16] = bytes[16].wrapping_sub(1);
    std::fs::write(&p, bytes).unwrap();
    match run(&tok, &input, &out, &o) {
        Err(e @ Error::Format { .. }) => {
            assert!(e.to_string().contains("offsets checksum"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    // The input position moved in the state (forward to the input's end, or into a line): the
    // texts between would be dropped, or a broken character blamed on the input.
    for (tag, edit) in [("g", 0usize), ("h", 1)] {
        let out = d.join(format!("{tag}.r3tok"));
        assert!(interrupted_run(&tok, &input, &out, &o, 6));
        let p = partial(&out, ".partial.state");
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let len = std::fs::metadata(&input).unwrap().len();
        let pos = state["reader"]["pos"].as_u64().unwrap();
        state["reader"]["pos"] = serde_json::json!(if edit == 0 { len } else { pos + 1 });
        std::fs::write(&p, serde_json::to_vec(&state).unwrap()).unwrap();
        match run(&tok, &input, &out, &o) {
            Err(e @ Error::Format { .. }) => {
                assert!(e.to_string().contains("is not the start of line"), "{e}")
            }
            other => panic!("{tag}: {other:?}"),
        }
    }

    // Partial files without a state (crash before the first checkpoint): a fresh start.
    let out = d.join("c.r3tok");
    assert!(interrupted_run(&tok, &input, &out, &o, 6));
    std::fs::remove_file(partial(&out, ".partial.state")).unwrap();
    run(&tok, &input, &out, &o).unwrap();
    let reference = d.join("ref.r3tok");
    run(&tok, &input, &reference, &o).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap());
}

/// Asserts an `Error::Input` at `line` whose message equals `read_texts`' for the same file.
fn assert_line_error(tok: &TextTokenizer, d: &Path, name: &str, bytes: &[u8], line: usize) {
    let input = d.join(name);
    std::fs::write(&input, bytes).unwrap();
    let ours = run(
        tok,
        &input,
        &d.join(format!("{name}.r3tok")),
        &opts(16, false, 2),
    );
    let theirs = read_texts(&input);
    match (&ours, &theirs) {
        (Err(Error::Input { path, line: l, .. }), Err(e2)) => {
            assert_eq!(path, &input);
            assert_eq!(*l, line, "{name}: {ours:?}");
            assert_eq!(ours.as_ref().unwrap_err().to_string(), e2.to_string());
        }
        _ => panic!("{name}: expected line errors, got {ours:?} and {theirs:?}"),
    }
}

#[test]
fn bad_lines_are_errors_with_their_line_number() {
    let tok = tokenizer();
    let d = tmpdir("badline");
    let ok = "{\"text\": \"fine\"}\n";
    assert_line_error(
        &tok,
        &d,
        "json.jsonl",
        format!("{ok}{ok}{{\"text\": \"x\"\n{ok}").as_bytes(),
        3,
    );
    assert_line_error(
        &tok,
        &d,
        "missing.jsonl",
        format!("{ok}{{\"txt\": \"x\"}}\n").as_bytes(),
        2,
    );
    assert_line_error(
        &tok,
        &d,
        "type.jsonl",
        format!("{ok}{ok}{ok}{{\"text\": 3}}\n").as_bytes(),
        4,
    );
    assert_line_error(
        &tok,
        &d,
        "array.jsonl",
        format!("{ok}[1, 2]\n").as_bytes(),
        2,
    );
    assert_line_error(&tok, &d, "blank.jsonl", format!("{ok}\n{ok}").as_bytes(), 2);
    assert_line_error(&tok, &d, "lead.jsonl", format!("\n{ok}").as_bytes(), 1);
    assert_line_error(
        &tok,
        &d,
        "utf8.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n",
        2,
    );
    assert_line_error(&tok, &d, "utf8.txt", b"one\ntwo\nthr\xC3ee\n", 3);
    // Past the first batches and checkpoints too.
    let mut long = ok.repeat(50);
    long.push_str("{\"text\": nope}\n");
    assert_line_error(&tok, &d, "late.jsonl", long.as_bytes(), 51);
}

#[test]
fn bad_options_and_paths_are_errors() {
    let tok = tokenizer();
    let d = tmpdir("opts");
    let input = d.join("in.txt");
    std::fs::write(&input, "a\nb\n").unwrap();
    let out = d.join("o.r3tok");
    for o in [
        opts(2, false, 4),
        opts(0, true, 4),
        opts(16, false, 0),
        TokenizeOptions {
            checkpoint_every: 0,
            ..opts(16, false, 4)
        },
    ] {
        assert!(
            matches!(run(&tok, &input, &out, &o), Err(Error::Invalid(_))),
            "{o:?}"
        );
    }
    assert!(matches!(
        run(&tok, &d.join("missing.txt"), &out, &opts(16, false, 4)),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        run(&tok, &input, &input, &opts(16, false, 4)),
        Err(Error::Invalid(_))
    ));
    // The input one of the output's working files (it was truncated and renamed into place).
    for suffix in [".partial", ".partial.offsets", ".partial.state"] {
        let work = d.join(format!("o.r3tok{suffix}"));
        std::fs::copy(&input, &work).unwrap();
        let e = run(&tok, &work, &out, &opts(16, false, 4)).unwrap_err();
        assert!(e.to_string().contains("working file"), "{suffix}: {e}");
        assert_eq!(std::fs::read(&work).unwrap(), b"a\nb\n", "{suffix}");
        assert!(!out.exists());
        std::fs::remove_file(&work).unwrap();
    }
    // A hard link to a working file is that file too.
    let work = d.join("o.r3tok.partial");
    std::fs::copy(&input, &work).unwrap();
    let link = d.join("hard.txt");
    std::fs::hard_link(&work, &link).unwrap();
    let e = run(&tok, &link, &out, &opts(16, false, 4)).unwrap_err();
    assert!(e.to_string().contains("working file"), "{e}");
    assert_eq!(std::fs::read(&link).unwrap(), b"a\nb\n");
    std::fs::remove_file(&work).unwrap();
    assert!(matches!(
        run(
            &tok,
            &input,
            &d.join("no/such/dir/o.r3tok"),
            &opts(16, false, 4)
        ),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        TokenCorpus::open(d.join("missing.r3tok")),
        Err(Error::Io { .. })
    ));
}

// ---- corrupt files ----

/// The documented checksum step (docs/formats.md).
fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
}
const SEED: u64 = 0x243F_6A88_85A3_08D3;

fn rehash_header(b: &mut [u8]) {
    let h = (0..8).fold(SEED, |h, k| {
        mix(
            h,
            u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().unwrap()),
        )
    });
    b[64..72].copy_from_slice(&h.to_le_bytes());
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Opens `bytes` as a file; `Ok(true)` when both `open` and `verify_tokens` accept it. A panic
/// fails the test with the case printed.
fn accepts(path: &Path, bytes: &[u8], case: &str) -> bool {
    std::fs::write(path, bytes).unwrap();
    match catch_unwind(|| TokenCorpus::open(path).and_then(|c| c.verify_tokens())) {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{case}: {msg}");
            assert!(matches!(e, Error::Format { .. }), "{case}: {e:?}");
            false
        }
        Err(_) => panic!("{case}: panicked"),
    }
}

fn small_corpus(d: &Path, pack: bool) -> Vec<u8> {
    let tok = tokenizer();
    let input = d.join("small.txt");
    // An odd token count (packed or not), hence padding before the offsets.
    std::fs::write(
        &input,
        "hello world\nBGE M3 is an embedding model\n北京\nx\n",
    )
    .unwrap();
    let out = d.join(format!("small-{pack}.r3tok"));
    run(&tok, &input, &out, &opts(8, pack, 2)).unwrap();
    std::fs::read(&out).unwrap()
}

#[test]
fn every_truncation_and_byte_flip_is_an_error() {
    let d = tmpdir("mutate");
    let path = d.join("m.r3tok");
    for pack in [false, true] {
        let good = small_corpus(&d, pack);
        let n_tokens = u64_at(&good, 40) as usize;
        assert!(
            good.len() < 400 && n_tokens % 2 == 1,
            "{} {n_tokens}",
            good.len()
        );
        assert!(accepts(&path, &good, "original"));
        for len in 0..good.len() {
            assert!(!accepts(
                &path,
                &good[..len],
                &format!("truncated to {len}")
            ));
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(!accepts(&path, &longer, "8 bytes appended"));
        for at in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut b = good.clone();
                b[at] ^= mask;
                let case = format!("pack {pack}: byte {at} ^ {mask:#x}");
                assert!(!accepts(&path, &b, &case), "{case} accepted");
            }
        }
    }
}

/// A `.r3tok` file built from the spec in docs/formats.md (not from the library's writer).
struct Spec {
    flags: u32,
    vocab: u32,
    max_len: u32,
    tokens: Vec<u32>,
    offsets: Vec<u64>,
    padding: u32,
}

impl Spec {
    fn of(file: &[u8]) -> Spec {
        let n_docs = u64_at(file, 32) as usize;
        let n_tokens = u64_at(file, 40) as usize;
        let u32_at = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
        let off_start = file.len() - 8 * (n_docs + 1);
        Spec {
            flags: u32_at(12),
            vocab: u32_at(24),
            max_len: u32_at(28),
            tokens: (0..n_tokens).map(|i| u32_at(HEADER_LEN + 4 * i)).collect(),
            offsets: (0..=n_docs)
                .map(|i| u64_at(file, off_start + 8 * i))
                .collect(),
            padding: 0,
        }
    }

    fn bytes(&self, fingerprint: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"R3TOK\0\0\0");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&fingerprint.to_le_bytes());
        b.extend_from_slice(&self.vocab.to_le_bytes());
        b.extend_from_slice(&self.max_len.to_le_bytes());
        b.extend_from_slice(&(self.offsets.len() as u64 - 1).to_le_bytes());
        b.extend_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        let th = self.tokens.iter().fold(SEED, |h, &t| mix(h, u64::from(t)));
        let oh = self.offsets.iter().fold(SEED, |h, &o| mix(h, o));
        b.extend_from_slice(&th.to_le_bytes());
        b.extend_from_slice(&oh.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        rehash_header(&mut b);
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        if self.tokens.len() % 2 == 1 {
            b.extend_from_slice(&self.padding.to_le_bytes());
        }
        for o in &self.offsets {
            b.extend_from_slice(&o.to_le_bytes());
        }
        b
    }
}

#[test]
fn structural_damage_with_valid_checksums_is_an_error() {
    let d = tmpdir("struct");
    let path = d.join("s.r3tok");
    for pack in [false, true] {
        let good = small_corpus(&d, pack);
        let fp = u64_at(&good, 16);
        let spec = Spec::of(&good);
        // The library writes exactly the documented layout.
        assert!(spec.bytes(fp) == good, "pack {pack}");
        let n = spec.offsets.len() - 1;
        assert!(n >= 3, "{n}");
        let cap = u64::from(spec.max_len) - 2;
        let last = spec.tokens.len() as u64;

        let mut cases: Vec<(String, Spec)> = Vec::new();
        let mut case = |name: &str, f: &dyn Fn(&mut Spec)| {
            let mut s = Spec::of(&good);
            f(&mut s);
            cases.push((format!("pack {pack}: {name}"), s));
        };
        case("unknown flag", &|s| s.flags |= 2);
        case("max_len 2", &|s| s.max_len = 2);
        case("max_len below the longest doc", &|s| s.max_len -= 1);
        case("vocab 0", &|s| s.vocab = 0);
        case("id outside the vocab", &|s| s.tokens[0] = s.vocab);
        case("non-zero padding", &|s| s.padding = 1);
        case("first offset not 0", &|s| s.offsets[0] = 1);
        case("last offset short", &|s| s.offsets[n] -= 1);
        case("last offset past the end", &|s| s.offsets[n] += 1);
        case("decreasing offsets", &|s| s.offsets.swap(1, 2));
        case("empty document", &|s| s.offsets[1] = s.offsets[2]);
        case("document longer than max_len - 2", &|s| {
            s.offsets.remove(1);
        });
        case("packed with a short block inside", &|s| {
            s.flags |= 1;
            s.offsets[1] = 1;
        });
        // A single document of cap + 1 tokens.
        case("single long document", &|s| {
            s.tokens.truncate(cap as usize + 1);
            s.offsets = vec![0, cap + 1];
        });
        for (name, s) in &cases {
            assert!(!accepts(&path, &s.bytes(fp), name), "{name} accepted");
        }
        // Header counts that disagree with the file length (header checksum recomputed).
        for (name, at, value) in [
            ("n_docs + 1", 32, n as u64 + 1),
            ("n_docs - 1", 32, n as u64 - 1),
            ("n_docs huge", 32, u64::MAX),
            ("n_tokens + 1", 40, last + 1),
            ("n_tokens + 2", 40, last + 2),
            ("n_tokens huge", 40, u64::MAX / 4),
        ] {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            rehash_header(&mut b);
            assert!(!accepts(&path, &b, name), "{name} accepted");
        }
    }
    // Other files are not .r3tok files.
    let tokjson = std::fs::read(fixture("tiny-xlmr/tokenizer.json")).unwrap();
    assert!(!accepts(&path, &tokjson, "tokenizer.json"));
}

#[test]
fn doc_panics_past_the_end_and_get_does_not() {
    let d = tmpdir("index");
    let b = small_corpus(&d, false);
    let path = d.join("i.r3tok");
    std::fs::write(&path, &b).unwrap();
    let c = TokenCorpus::open(&path).unwrap();
    assert_eq!(c.len(), 4);
    assert_eq!(c.doc_len(1), Some(c.doc(1).len()));
    assert_eq!(c.doc_len(4), None);
    assert!(c.get(usize::MAX).is_none());
    assert!(catch_unwind(|| c.doc(4).len()).is_err());
}

// ---- the CLI ----

/// `retrom3 pretrain` for one step of 2 texts of 16 tokens on `data` with tiny-xlmr.
fn pretrain_one_step(data: &Path, out: &Path) -> std::process::Output {
    let config = fixture("tiny-xlmr").join("config.json");
    let tokdir = fixture("tiny-xlmr");
    bin(&[
        "pretrain",
        "--config",
        config.to_str().unwrap(),
        "--tokenizer",
        tokdir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--max-len",
        "16",
    ])
}

fn bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(args)
        .output()
        .expect("run retrom3")
}

#[test]
fn cli_tokenize_writes_the_library_file() {
    let tok = tokenizer();
    let d = tmpdir("cli");
    let input = d.join("in.jsonl");
    write_jsonl(&input, &texts(100, 8));
    let tokdir = fixture("tiny-xlmr");
    for pack in [false, true] {
        let out = d.join(format!("cli-{pack}.r3tok"));
        let mut args = vec![
            "tokenize",
            "--tokenizer",
            tokdir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-len",
            "20",
            "--batch",
            "9",
        ];
        if pack {
            args.push("--pack");
        }
        let r = bin(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "{err}");
        let lib = d.join(format!("lib-{pack}.r3tok"));
        let stats = run(&tok, &input, &lib, &opts(20, pack, 1024)).unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&lib).unwrap());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{} docs, {} tokens", stats.docs, stats.tokens)),
            "{err}"
        );
        assert!(
            err.contains(&format!("{} empty skipped", stats.skipped_empty)),
            "{err}"
        );
    }
}

#[test]
fn cli_tokenize_reports_a_bad_line_in_one_line() {
    let d = tmpdir("clierr");
    let input = d.join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": 5}\n",
    )
    .unwrap();
    let out = d.join("o.r3tok");
    let r = bin(&[
        "tokenize",
        "--tokenizer",
        fixture("tiny-xlmr").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("retrom3: error: "), "{err}");
    assert!(err.contains("bad.jsonl:3: field \"text\""), "{err}");
    assert!(!out.exists());
}

#[test]
fn an_output_that_is_a_directory_fails_before_reading() {
    let tok = tokenizer();
    let d = tmpdir("outdir");
    let input = d.join("in.jsonl");
    write_jsonl(&input, &texts(20, 1));
    let out = d.join("corpus.r3tok");
    std::fs::create_dir_all(&out).unwrap();
    let e = run(&tok, &input, &out, &opts(32, false, 8))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "no work files left: {left:?}");
}

#[test]
fn a_huge_line_tokenizes_as_the_whole_text() {
    // Lines over 64 KiB are tokenized in pieces cut at single spaces: the documents are those of
    // the whole text, packed or truncated.
    let tok = tokenizer();
    let d = tmpdir("huge");
    let input = d.join("in.jsonl");
    let words = ["alpha", "Beta", "gamma42", "Größe", "北京", "x", "end."];
    let mut huge = String::new();
    let mut i = 0;
    while huge.len() < 400_000 {
        huge.push_str(words[i % words.len()]);
        huge.push_str(if i % 11 == 0 { "  " } else { " " });
        i += 1;
    }
    let all = vec![
        "short text".to_string(),
        huge.clone(),
        "another".to_string(),
    ];
    write_jsonl(&input, &all);
    let whole = tok.inner().encode_fast(huge.as_str(), false).unwrap();
    for pack in [false, true] {
        let out = d.join(format!("c{pack}.r3tok"));
        run(&tok, &input, &out, &opts(64, pack, 2)).unwrap();
        let c = TokenCorpus::open(&out).unwrap();
        let got: Vec<u32> = docs(&c).concat();
        let short = |t: &str| {
            tok.inner()
                .encode_fast(t, false)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        let want: Vec<u32> = if pack {
            [
                short("short text"),
                whole.get_ids().to_vec(),
                short("another"),
            ]
            .concat()
        } else {
            [
                short("short text"),
                whole.get_ids()[..62].to_vec(),
                short("another"),
            ]
            .concat()
        };
        assert_eq!(got, want, "pack {pack}");
    }
}

/// An output that exists and is not a regular file (a FIFO, a device) is refused before any
/// work: the token file is renamed into place (which would replace it) and memory-mapped.
#[cfg(unix)]
#[test]
fn an_output_that_is_a_fifo_is_refused() {
    let d = tmpdir("fifo-out");
    let input = d.join("in.txt");
    std::fs::write(&input, "hello world\nsecond text\n").unwrap();
    let out = d.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&out).status();
    if !made.is_ok_and(|s| s.success()) {
        return;
    }
    let e = run(&tokenizer(), &input, &out, &opts(16, false, 4))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fifo") && e.contains("not a regular file"),
        "{e}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&out).unwrap().file_type().is_fifo());
}

/// A token file is known by its name or by its magic (`pretrain --data corpus` with no extension
/// read it as text and stopped on its first non-UTF-8 byte); a text file is not one.
#[test]
fn token_files_are_known_by_name_or_magic() {
    let tok = tokenizer();
    let d = tmpdir("magic");
    let input = d.join("in.txt");
    std::fs::write(&input, "alpha beta\ngamma delta\n").unwrap();
    let out = d.join("c.r3tok");
    run(&tok, &input, &out, &opts(16, false, 4)).unwrap();
    let renamed = d.join("corpus");
    std::fs::copy(&out, &renamed).unwrap();
    assert!(TokenCorpus::is_token_file(&out));
    assert!(TokenCorpus::is_token_file(&renamed));
    assert!(TokenCorpus::is_token_file(&d.join("absent.R3TOK")));
    assert!(!TokenCorpus::is_token_file(&input));
    assert!(!TokenCorpus::is_token_file(&d.join("absent")));
    // The CLI trains on the renamed file.
    let r = pretrain_one_step(&renamed, &d.join("run"));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// A tokenizer directory whose sentence_bert_config.json lower-cases texts: `tokenize` stores the
/// lower-cased text's ids (short and long texts alike) under another fingerprint.
#[test]
fn a_lowercasing_tokenizer_tokenizes_lowercased_texts() {
    let d = tmpdir("lower");
    let tokdir = d.join("tok");
    std::fs::create_dir_all(&tokdir).unwrap();
    std::fs::copy(
        fixture("tiny-xlmr").join("tokenizer.json"),
        tokdir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        tokdir.join("sentence_bert_config.json"),
        r#"{"do_lower_case": true}"#,
    )
    .unwrap();
    let lower = TextTokenizer::from_dir(&tokdir).unwrap();
    let plain = tokenizer();
    let long = "Word ".repeat(20_000);
    let texts = ["Hello World".to_string(), long.clone()];
    let input = d.join("in.jsonl");
    write_jsonl(&input, &texts);
    let out = d.join("c.r3tok");
    run(&lower, &input, &out, &opts(16, false, 4)).unwrap();
    let c = TokenCorpus::open(&out).unwrap();
    assert_eq!(
        docs(&c),
        vec![
            plain.content_ids("hello world").unwrap(),
            plain.content_ids(&long.to_lowercase()).unwrap()[..14].to_vec(),
        ]
    );
    assert_ne!(
        retrom3::data::corpus::tokenizer_fingerprint(&lower).unwrap(),
        retrom3::data::corpus::tokenizer_fingerprint(&plain).unwrap()
    );
    assert_ne!(
        plain.content_ids("Hello").unwrap(),
        plain.content_ids("hello").unwrap()
    );
}

/// An interrupted run's `<output>.partial` given to `pretrain` is named as such (it used to be
/// read as a text corpus and fail on "invalid UTF-8"); an output in a missing directory is named
/// by the path given, not by a working file.
#[test]
fn an_unfinished_output_and_a_missing_directory_are_named() {
    let tok = tokenizer();
    let d = tmpdir("unfinished");
    let input = d.join("in.jsonl");
    write_jsonl(&input, &texts(100, 2));
    let o = TokenizeOptions {
        max_len: 24,
        pack: true,
        batch: 8,
        checkpoint_every: 1,
    };
    let out = d.join("c.r3tok");
    assert!(interrupted_run(&tok, &input, &out, &o, 4));
    let part = partial(&out, ".partial");
    assert!(part.is_file() && partial(&out, ".partial.state").is_file());
    assert!(TokenCorpus::is_token_file(&part));
    let e = TokenCorpus::open(&part).err().unwrap().to_string();
    assert!(
        e.contains("c.r3tok.partial")
            && e.contains("interrupted `retrom3 tokenize`")
            && e.contains("then use")
            && e.ends_with("c.r3tok"),
        "{e}"
    );
    let r = pretrain_one_step(&part, &d.join("run"));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted `retrom3 tokenize`"), "{err}");

    // Interrupted before its first checkpoint: no state file yet, the offsets are there.
    let early = d.join("early.r3tok");
    let o1 = TokenizeOptions {
        checkpoint_every: 1000,
        ..o.clone()
    };
    assert!(interrupted_run(&tok, &input, &early, &o1, 1));
    let part = partial(&early, ".partial");
    assert!(part.is_file() && !partial(&early, ".partial.state").exists());
    assert!(TokenCorpus::is_token_file(&part));
    let e = TokenCorpus::open(&part).err().unwrap().to_string();
    assert!(e.contains("interrupted `retrom3 tokenize`"), "{e}");

    let missing = d.join("nodir").join("x.r3tok");
    let e = run(&tok, &input, &missing, &o).unwrap_err().to_string();
    assert!(
        e.contains("x.r3tok: the output's directory") && !e.contains(".partial"),
        "{e}"
    );
}
