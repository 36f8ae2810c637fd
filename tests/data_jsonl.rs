//! JSONL / plain-text readers: mode detection, line rules, and every error with its exact line.

use std::fs;
use std::path::PathBuf;

use retrom3::data::jsonl::{read_jsonl, read_pairs, read_texts, QueryPassage};
use retrom3::Error;
use serde::Deserialize;

/// Writes `bytes` to a fresh file under the system temp dir, unique per test.
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retrom3-data-jsonl-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// Asserts an `Error::Input` at `line` whose message contains every one of `needles`.
fn assert_input_err<T: std::fmt::Debug>(
    r: retrom3::Result<T>,
    path: &PathBuf,
    line: usize,
    needles: &[&str],
) {
    match r {
        Err(Error::Input {
            path: p,
            line: l,
            msg,
        }) => {
            assert_eq!(&p, path);
            assert_eq!(l, line, "wrong line; msg = {msg}");
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} should contain {n:?}");
            }
        }
        other => panic!("expected Error::Input at line {line}, got {other:?}"),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn jsonl_texts() {
    let p = file("ok.jsonl", b"{\"text\": \"hello\"}\n{\"text\": \"\", \"id\": 7}\n  {\"text\": \"caf\\u00e9 \xe2\x96\x81\"}\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&["hello", "", "café ▁"]));
}

#[test]
fn jsonl_trailing_blank_lines_are_skipped() {
    let p = file("trail.jsonl", b"{\"text\": \"a\"}\n\n  \n\r\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&["a"]));
    let p = file("nonl.jsonl", b"{\"text\": \"a\"}\r\n{\"text\": \"b\"}");
    assert_eq!(read_texts(&p).unwrap(), strings(&["a", "b"]));
}

#[test]
fn jsonl_blank_line_in_the_middle_is_an_error() {
    let p = file(
        "mid.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n\n \n{\"text\": \"c\"}\n",
    );
    assert_input_err(read_texts(&p), &p, 3, &["blank"]);
    // Leading blank lines before JSONL data are "in the middle" too.
    let p = file("lead.jsonl", b"\n{\"text\": \"a\"}\n");
    assert_input_err(read_texts(&p), &p, 1, &["blank"]);
}

#[test]
fn jsonl_invalid_json_names_the_line() {
    let p = file(
        "badjson.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"\n",
    );
    assert_input_err(read_texts(&p), &p, 3, &["invalid JSON", "column"]);
    let p = file("plainline.jsonl", b"{\"text\": \"a\"}\nnot json\n");
    assert_input_err(read_texts(&p), &p, 2, &["invalid JSON"]);
    let p = file("array.jsonl", b"{\"text\": \"a\"}\n[\"text\"]\n");
    assert_input_err(read_texts(&p), &p, 2, &["object", "text"]);
}

#[test]
fn jsonl_missing_or_mistyped_text_names_line_and_field() {
    let p = file("missing.jsonl", b"{\"text\": \"a\"}\n{\"txt\": \"b\"}\n");
    assert_input_err(read_texts(&p), &p, 2, &["\"text\"", "missing"]);
    let p = file(
        "number.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": 3}\n",
    );
    assert_input_err(read_texts(&p), &p, 3, &["\"text\"", "string", "number"]);
    let p = file("null.jsonl", b"{\"text\": null}\n");
    assert_input_err(read_texts(&p), &p, 1, &["\"text\"", "null"]);
}

#[test]
fn invalid_utf8_names_the_line() {
    let p = file(
        "bad.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"\xff\xfe\"}\n",
    );
    assert_input_err(read_texts(&p), &p, 2, &["UTF-8"]);
    let p = file("bad.txt", b"first\nsecond\nthi\xc3rd\n");
    assert_input_err(read_texts(&p), &p, 3, &["UTF-8", "byte 4"]);
    // A first line that is not valid UTF-8 (and does not start with '{') is plain text, line 1.
    let p = file("bad1.txt", b"\x80abc\n");
    assert_input_err(read_texts(&p), &p, 1, &["UTF-8"]);
}

#[test]
fn plain_text_mode() {
    let p = file("plain.txt", b"hello world\n\n  \nlast line\n");
    assert_eq!(
        read_texts(&p).unwrap(),
        strings(&["hello world", "", "  ", "last line"])
    );
    // No final newline, CRLF, and a line that only looks like JSON later on.
    let p = file("plain2.txt", b"a\r\n{\"text\": \"b\"}\r\nc");
    assert_eq!(
        read_texts(&p).unwrap(),
        strings(&["a", "{\"text\": \"b\"}", "c"])
    );
    // Leading blank lines are empty texts in plain mode.
    let p = file("plain3.txt", b"\n\nx\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&["", "", "x"]));
    // Two final newlines: the last line is an empty text.
    let p = file("plain4.txt", b"x\n\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&["x", ""]));
}

#[test]
fn edge_files() {
    let p = file("empty.txt", b"");
    assert_eq!(read_texts(&p).unwrap(), Vec::<String>::new());
    let p = file("onlynl.txt", b"\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&[""]));
    let p = file("bom.jsonl", b"\xef\xbb\xbf{\"text\": \"a\"}\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&["a"]));
    let p = file("bom.txt", b"\xef\xbb\xbfa\n");
    assert_eq!(read_texts(&p).unwrap(), strings(&["a"]));
    let missing = PathBuf::from("/nonexistent/retrom3/texts.jsonl");
    assert!(matches!(read_texts(&missing), Err(Error::Io { path, .. }) if path == missing));
}

#[test]
fn pairs() {
    let p = file(
        "pairs.jsonl",
        "{\"query\": \"q1\", \"passage\": \"p1\", \"score\": 1.0}\n{\"passage\": \"p2\", \"query\": \"q2\"}\n\n".as_bytes(),
    );
    assert_eq!(
        read_pairs(&p).unwrap(),
        vec![
            QueryPassage {
                query: "q1".into(),
                passage: "p1".into()
            },
            QueryPassage {
                query: "q2".into(),
                passage: "p2".into()
            },
        ]
    );
}

#[test]
fn pairs_errors_name_line_and_field() {
    let p = file(
        "pairs-missing.jsonl",
        b"{\"query\": \"q1\", \"passage\": \"p1\"}\n{\"query\": \"q2\"}\n",
    );
    assert_input_err(read_pairs(&p), &p, 2, &["field \"passage\": missing"]);
    let p = file("pairs-type.jsonl", b"{\"query\": 5, \"passage\": \"p1\"}\n");
    assert_input_err(
        read_pairs(&p),
        &p,
        1,
        &["field \"query\": expected a string, got a number"],
    );
    let p = file(
        "pairs-list.jsonl",
        b"{\"query\": \"q\", \"passage\": [\"p\"]}\n",
    );
    assert_input_err(read_pairs(&p), &p, 1, &["field \"passage\"", "an array"]);
    let p = file("pairs-text.jsonl", b"just some text\n");
    assert_input_err(read_pairs(&p), &p, 1, &["invalid JSON"]);
    let p = file("pairs-array.jsonl", b"[\"q\", \"p\"]\n");
    assert_input_err(read_pairs(&p), &p, 1, &["expected a JSON object"]);
    // The serde message must not point at "line 1" of the one-line parse.
    match read_pairs(&p) {
        Err(e) => assert!(!e.to_string().contains("at line 1"), "{e}"),
        Ok(_) => unreachable!(),
    }
    let p = file(
        "pairs-blank.jsonl",
        b"{\"query\": \"q\", \"passage\": \"p\"}\n\n{\"query\": \"q\", \"passage\": \"p\"}\n",
    );
    assert_input_err(read_pairs(&p), &p, 2, &["blank"]);
    let p = file(
        "pairs-utf8.jsonl",
        b"{\"query\": \"q\", \"passage\": \"p\"}\n{\"query\": \"\xc0\", \"passage\": \"p\"}\n",
    );
    assert_input_err(read_pairs(&p), &p, 2, &["UTF-8"]);
}

#[test]
fn generic_records() {
    #[derive(Debug, Deserialize, PartialEq)]
    struct Rec {
        query: String,
        pos: Vec<String>,
        #[serde(default)]
        neg: Vec<String>,
    }
    let p = file(
        "generic.jsonl",
        b"{\"query\": \"q\", \"pos\": [\"a\"], \"neg\": [\"b\", \"c\"]}\n{\"query\": \"r\", \"pos\": []}\n",
    );
    let recs: Vec<Rec> = read_jsonl(&p).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].neg, vec!["b".to_string(), "c".to_string()]);
    assert!(recs[1].neg.is_empty());
    let p = file(
        "generic-bad.jsonl",
        b"{\"query\": \"q\", \"pos\": [\"a\"]}\n{\"query\": \"q\", \"pos\": \"a\"}\n",
    );
    assert_input_err(read_jsonl::<Rec>(&p), &p, 2, &["invalid type"]);
}
