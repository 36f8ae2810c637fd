//! `TextTokenizer` on small tokenizers built with the `tokenizers` crate and saved as tokenizer.json:
//! a BERT-like WordPiece and an XLM-R-like SentencePiece Unigram. Checks truncation (max_length
//! counts the specials), pairs (longest_first), literal special tokens, word indices, special ids,
//! and that the file's own padding / truncation are ignored.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use retrom3::data::tokenizer::TextTokenizer;
use retrom3::Error;
use tokenizers::models::unigram::Unigram;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// A fresh tokenizer.json path, unique per call (tests run in parallel).
fn temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "retrom3-data-tokenizer-{}-{name}-{n}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("tokenizer.json")
}

// BERT-like ids.
const PAD: u32 = 0;
const UNK: u32 = 1;
const CLS: u32 = 2;
const SEP: u32 = 3;
const MASK: u32 = 4;
const HELLO: u32 = 5;
const WORLD: u32 = 6;
const THE: u32 = 7;
const CAT: u32 = 8;
const UN: u32 = 9;
const BELIEV: u32 = 10;
const ABLE: u32 = 11;
const COMMA: u32 = 12;
const A: u32 = 14;
const B: u32 = 15;
const C: u32 = 16;
const D: u32 = 17;

/// A lowercasing WordPiece tokenizer with `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` templates.
fn bert_tokenizer() -> Tokenizer {
    let vocab = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "cat", "un",
        "##believ", "##able", ",", ".", "a", "b", "c", "d", "e",
    ];
    let vocab: [(String, u32); 19] = std::array::from_fn(|i| (vocab[i].to_string(), i as u32));
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tk = Tokenizer::new(model);
    tk.with_normalizer(Some(BertNormalizer::default())).unwrap();
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    tk.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", CLS), ("[SEP]", SEP)])
            .build()
            .unwrap(),
    ));
    tk.add_special_tokens(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(|t| AddedToken::from(t, true)),
    )
    .unwrap();
    tk
}

fn load(tk: &Tokenizer, name: &str) -> TextTokenizer {
    let path = temp_path(name);
    tk.save(&path, false).unwrap();
    TextTokenizer::from_file(&path).unwrap()
}

fn bert() -> TextTokenizer {
    load(&bert_tokenizer(), "bert")
}

// XLM-R-like ids (fairseq layout: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last).
const X_HELLO: u32 = 4;
const X_WORLD: u32 = 5;
const X_UN: u32 = 6;
const X_BELIEV: u32 = 7;
const X_ABLE: u32 = 8;
const X_MASK: u32 = 17;

/// A SentencePiece-style Unigram with Metaspace ("▁", prepend always) and XLM-R's templates.
fn xlmr_tokenizer() -> Tokenizer {
    let pieces: Vec<(String, f64)> = [
        ("<s>", 0.0),
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁hello", -2.0),
        ("▁world", -2.0),
        ("▁un", -3.0),
        ("believ", -3.0),
        ("able", -3.0),
        ("▁", -4.0),
        ("h", -6.0),
        ("e", -6.0),
        ("l", -6.0),
        ("o", -6.0),
        ("w", -6.0),
        ("r", -6.0),
        ("d", -6.0),
        ("<mask>", 0.0),
    ]
    .into_iter()
    .map(|(p, s)| (p.to_string(), s))
    .collect();
    let mut tk = Tokenizer::new(Unigram::from(pieces, Some(3), false).unwrap());
    tk.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tk.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A </s>")
            .unwrap()
            .try_pair("<s> $A </s> </s> $B </s>")
            .unwrap()
            .special_tokens(vec![("<s>", 0), ("</s>", 2)])
            .build()
            .unwrap(),
    ));
    tk.add_special_tokens(
        ["<s>", "<pad>", "</s>", "<unk>"]
            .map(|t| AddedToken::from(t, true))
            .into_iter()
            .chain([AddedToken::from("<mask>", true).lstrip(true)]),
    )
    .unwrap();
    tk
}

fn xlmr() -> TextTokenizer {
    load(&xlmr_tokenizer(), "xlmr")
}

fn assert_invalid<T: std::fmt::Debug>(r: retrom3::Result<T>) {
    assert!(
        matches!(r, Err(Error::Invalid(_))),
        "expected Error::Invalid, got {r:?}"
    );
}

#[test]
fn bert_single_texts() {
    let t = bert();
    assert_eq!(
        t.encode("Hello world", 512).unwrap(),
        [CLS, HELLO, WORLD, SEP]
    );
    assert_eq!(
        t.encode("hello, cat", 512).unwrap(),
        [CLS, HELLO, COMMA, CAT, SEP]
    );
    assert_eq!(t.encode("the zebra", 512).unwrap(), [CLS, THE, UNK, SEP]);
    assert_eq!(
        t.encode("unbelievable", 512).unwrap(),
        [CLS, UN, BELIEV, ABLE, SEP]
    );
}

#[test]
fn empty_text_is_just_the_specials() {
    assert_eq!(bert().encode("", 8).unwrap(), [CLS, SEP]);
    assert_eq!(bert().encode("   ", 2).unwrap(), [CLS, SEP]);
    assert_eq!(xlmr().encode("", 8).unwrap(), [0, 2]);
}

#[test]
fn truncation_counts_the_specials() {
    let t = bert();
    assert_eq!(
        t.encode("a b c d e", 7).unwrap(),
        [CLS, A, B, C, D, 18, SEP]
    );
    assert_eq!(t.encode("a b c d e", 6).unwrap(), [CLS, A, B, C, D, SEP]);
    assert_eq!(t.encode("a b c d e", 4).unwrap(), [CLS, A, B, SEP]);
    assert_eq!(t.encode("a b c d e", 3).unwrap(), [CLS, A, SEP]);
    assert_eq!(t.encode("a b c d e", 2).unwrap(), [CLS, SEP]);
    // Truncation can split a word: the first pieces are kept.
    assert_eq!(
        t.encode("unbelievable cat", 4).unwrap(),
        [CLS, UN, BELIEV, SEP]
    );
    let x = xlmr();
    assert_eq!(
        x.encode("hello world hello", 4).unwrap(),
        [0, X_HELLO, X_WORLD, 2]
    );
}

#[test]
fn max_length_below_two_is_invalid() {
    for t in [bert(), xlmr()] {
        assert_invalid(t.encode("a", 1));
        assert_invalid(t.encode("", 0));
        assert_invalid(t.encode_batch(&["a"], 1));
        assert_invalid(t.encode_batch(&[], 0));
        assert_invalid(t.encode_with_words("a", 1));
    }
    // A pair needs room for its 3 (BERT) or 4 (XLM-R) specials.
    assert_invalid(bert().encode_pair("a", "b", 2));
    assert_invalid(xlmr().encode_pair("hello", "world", 3));
}

#[test]
fn literal_special_tokens_are_matched_in_raw_text() {
    let t = bert();
    assert_eq!(
        t.encode("hello [MASK] world", 16).unwrap(),
        [CLS, HELLO, MASK, WORLD, SEP]
    );
    assert_eq!(
        t.encode("hello[MASK]world", 16).unwrap(),
        [CLS, HELLO, MASK, WORLD, SEP]
    );
    assert_eq!(
        t.encode("[CLS] a [SEP]", 16).unwrap(),
        [CLS, CLS, A, SEP, SEP]
    );
    let x = xlmr();
    // <mask> strips the space on its left, as XLM-R's does.
    assert_eq!(
        x.encode("hello <mask> world", 16).unwrap(),
        [0, X_HELLO, X_MASK, X_WORLD, 2]
    );
    assert_eq!(
        x.encode("hello<mask>world", 16).unwrap(),
        [0, X_HELLO, X_MASK, X_WORLD, 2]
    );
    assert_eq!(x.encode("<s>hello</s>", 16).unwrap(), [0, 0, X_HELLO, 2, 2]);
}

#[test]
fn sentencepiece_pieces() {
    let x = xlmr();
    assert_eq!(
        x.encode("hello world", 512).unwrap(),
        [0, X_HELLO, X_WORLD, 2]
    );
    assert_eq!(
        x.encode("unbelievable", 512).unwrap(),
        [0, X_UN, X_BELIEV, X_ABLE, 2]
    );
    // Unknown characters map to <unk>, never panic.
    let ids = x.encode("héllo ☃ \u{0}", 512).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 2));
    assert!(ids.contains(&3));
}

#[test]
fn pairs_truncate_longest_first() {
    let t = bert();
    assert_eq!(
        t.encode_pair("a b", "hello", 512).unwrap(),
        [CLS, A, B, SEP, HELLO, SEP]
    );
    // Room 5: the short side (1) is kept, the long side gets 4.
    assert_eq!(
        t.encode_pair("a b c d e", "hello", 8).unwrap(),
        [CLS, A, B, C, D, SEP, HELLO, SEP]
    );
    assert_eq!(
        t.encode_pair("hello", "a b c d e", 8).unwrap(),
        [CLS, HELLO, SEP, A, B, C, D, SEP]
    );
    // Both too long: room 4 -> 2 + 2; room 5 -> 2 + 3 (the first text gets the smaller half).
    assert_eq!(
        t.encode_pair("a b c d e", "a b c d e", 7).unwrap(),
        [CLS, A, B, SEP, A, B, SEP]
    );
    assert_eq!(
        t.encode_pair("a b c d e", "a b c d e", 8).unwrap(),
        [CLS, A, B, SEP, A, B, C, SEP]
    );
    assert_eq!(t.encode_pair("", "", 3).unwrap(), [CLS, SEP, SEP]);
    let x = xlmr();
    assert_eq!(
        x.encode_pair("hello", "world", 512).unwrap(),
        [0, X_HELLO, 2, 2, X_WORLD, 2]
    );
    assert_eq!(
        x.encode_pair("hello world", "world", 6).unwrap(),
        [0, X_HELLO, 2, 2, X_WORLD, 2]
    );
}

#[test]
fn batch_equals_single() {
    for t in [bert(), xlmr()] {
        let texts = [
            "hello world",
            "",
            "a b c d e unbelievable",
            "hello <mask> [MASK] world",
        ];
        for max_length in [2, 3, 5, 512] {
            let batch = t.encode_batch(&texts, max_length).unwrap();
            let single: Vec<Vec<u32>> = texts
                .iter()
                .map(|s| t.encode(s, max_length).unwrap())
                .collect();
            assert_eq!(batch, single);
        }
        assert!(t.encode_batch(&[], 8).unwrap().is_empty());
    }
}

#[test]
fn wordpiece_words_follow_continuations() {
    let t = bert();
    let (ids, words) = t.encode_with_words("the unbelievable cat", 512).unwrap();
    assert_eq!(ids, [CLS, THE, UN, BELIEV, ABLE, CAT, SEP]);
    assert_eq!(
        words,
        [None, Some(0), Some(1), Some(1), Some(1), Some(2), None]
    );
    // Punctuation is a word of its own (BERT's pre-tokenizer splits it), so is a literal [MASK].
    let (ids, words) = t.encode_with_words("hello, [MASK] world", 512).unwrap();
    assert_eq!(ids, [CLS, HELLO, COMMA, MASK, WORLD, SEP]);
    assert_eq!(words, [None, Some(0), Some(1), Some(2), Some(3), None]);
    let (ids, words) = t.encode_with_words("unbelievable cat", 4).unwrap();
    assert_eq!(ids, [CLS, UN, BELIEV, SEP]);
    assert_eq!(words, [None, Some(0), Some(0), None]);
    assert_eq!(
        t.encode_with_words("", 4).unwrap(),
        (vec![CLS, SEP], vec![None, None])
    );
}

#[test]
fn sentencepiece_words_follow_word_starts() {
    let x = xlmr();
    let (ids, words) = x
        .encode_with_words("hello unbelievable world", 512)
        .unwrap();
    assert_eq!(ids, [0, X_HELLO, X_UN, X_BELIEV, X_ABLE, X_WORLD, 2]);
    assert_eq!(
        words,
        [None, Some(0), Some(1), Some(1), Some(1), Some(2), None]
    );
    let (ids, words) = x.encode_with_words("hello<mask>unbelievable", 512).unwrap();
    assert_eq!(ids, [0, X_HELLO, X_MASK, X_UN, X_BELIEV, X_ABLE, 2]);
    assert_eq!(
        words,
        [None, Some(0), Some(1), Some(2), Some(2), Some(2), None]
    );
    // The ids always equal encode()'s.
    for text in ["hello world", "wor ld", "<s>hello", "hello   world"] {
        let (ids, words) = x.encode_with_words(text, 5).unwrap();
        assert_eq!(ids, x.encode(text, 5).unwrap());
        assert_eq!(ids.len(), words.len());
    }
}

#[test]
fn special_ids_and_vocab() {
    let t = bert();
    assert_eq!(
        (t.cls_id(), t.eos_id(), t.pad_id(), t.unk_id(), t.mask_id()),
        (Some(CLS), Some(SEP), Some(PAD), Some(UNK), Some(MASK))
    );
    assert_eq!(t.special_ids(), [PAD, UNK, CLS, SEP]);
    assert_eq!(t.vocab_size(), 19);
    assert_eq!(t.id_to_token(HELLO).as_deref(), Some("hello"));
    assert_eq!(t.id_to_token(BELIEV).as_deref(), Some("##believ"));
    assert_eq!(t.id_to_token(1000), None);

    let x = xlmr();
    assert_eq!(
        (x.cls_id(), x.eos_id(), x.pad_id(), x.unk_id(), x.mask_id()),
        (Some(0), Some(2), Some(1), Some(3), Some(X_MASK))
    );
    assert_eq!(x.special_ids(), [0, 1, 2, 3]);
    assert_eq!(x.vocab_size(), 18);
    assert_eq!(x.id_to_token(X_HELLO).as_deref(), Some("▁hello"));
}

#[test]
fn builtin_padding_and_truncation_are_disabled() {
    let mut tk = bert_tokenizer();
    tk.with_truncation(Some(TruncationParams {
        max_length: 3,
        ..Default::default()
    }))
    .unwrap();
    tk.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(16),
        ..Default::default()
    }));
    let t = load(&tk, "bert-padded");
    assert_eq!(
        t.encode("a b c d e", 512).unwrap(),
        [CLS, A, B, C, D, 18, SEP]
    );
    assert_eq!(
        t.encode_batch(&["a", "a b"], 512).unwrap(),
        [vec![CLS, A, SEP], vec![CLS, A, B, SEP]]
    );
    assert_eq!(t.encode_pair("a", "b", 512).unwrap(), [CLS, A, SEP, B, SEP]);
}

#[test]
fn load_errors_name_the_file() {
    let missing = PathBuf::from("/nonexistent/retrom3/tokenizer.json");
    assert!(
        matches!(TextTokenizer::from_file(&missing), Err(Error::Io { path, .. }) if path == missing)
    );
    assert!(TextTokenizer::from_dir("/nonexistent/retrom3").is_err());

    let bad = temp_path("bad");
    std::fs::write(&bad, "{\"version\": \"1.0\", \"model\": 3}").unwrap();
    match TextTokenizer::from_file(&bad) {
        Err(Error::Tokenizer(msg)) => assert!(msg.contains(&*bad.to_string_lossy()), "{msg}"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
}

#[test]
fn from_dir_finds_tokenizer_json() {
    let path = temp_path("fromdir");
    bert_tokenizer().save(&path, false).unwrap();
    let t = TextTokenizer::from_dir(path.parent().unwrap()).unwrap();
    assert_eq!(t.path(), path);
    assert_eq!(t.encode("hello", 8).unwrap(), [CLS, HELLO, SEP]);
}

/// Texts over 64 KiB are tokenized from a prefix ending at a word end (memory follows the max
/// length, not the text): the ids must equal those of the whole text, for the real XLM-R
/// (SentencePiece) and BERT (WordPiece) tokenizers of the fixtures, whatever the whitespace.
#[test]
fn long_texts_tokenize_as_the_whole_text() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let words = [
        "BGE",
        "M3",
        "is",
        "an",
        "embedding",
        "model,",
        "Die",
        "Größe",
        "der",
        "Bäume",
        "北京是中国的首都。",
        "multi-vector",
        "retrieval",
        "ﬁne",
        "x\u{301}",
        "(BM25)",
        "…",
    ];
    let seps = [" ", "  ", "\n", " \t ", "\u{a0}", "   \n  ", "\u{3000}"];
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < 600_000 {
        text.push_str(words[i % words.len()]);
        text.push_str(seps[(i * 7 + i / 3) % seps.len()]);
        i += 1;
    }
    // No space at all: the whole text is tokenized (no word end to cut at).
    let cjk: String = "北京是中国的首都。".repeat(9000);
    for dir in ["tiny-xlmr", "tiny-bert"] {
        let tok = TextTokenizer::from_dir(root.join(dir)).unwrap();
        for t in [&text, &cjk] {
            assert!(t.len() > 65_536);
            let full = tok.inner().encode_fast(t.as_str(), false).unwrap();
            for m in [8usize, 512, 2048, 8192, 100_000] {
                let got = tok.encode(t, m).unwrap();
                let n = (m - 2).min(full.get_ids().len());
                assert_eq!(got.len(), n + 2, "{dir} m={m}");
                assert_eq!(&got[1..n + 1], &full.get_ids()[..n], "{dir} m={m}");
                let batch = tok.encode_batch(&["short", t, ""], m).unwrap();
                assert_eq!(batch[1], got, "{dir} m={m}: batch");
                assert_eq!(batch[0], tok.encode("short", m).unwrap());
            }
            // All ids, tokenized piece by piece (`retrom3 tokenize`): the whole text's.
            assert_eq!(
                tok.content_ids(t).unwrap(),
                full.get_ids(),
                "{dir}: content_ids"
            );
        }
    }
}

/// A run of over `FORCED_CUT_BYTES` without a space (CJK text) is tokenized in pieces cut at a
/// character boundary (the whole run took ~150 bytes of tokenizer state per byte: 2.4 GB for a
/// 16 MB line). BERT isolates CJK characters, so its ids stay the whole text's; SentencePiece may
/// differ next to each cut only. The truncating `encode` keeps the whole text's first tokens.
/// Text in other scripts with spaces (Cyrillic) is cut at its spaces: exact ids (it was cut
/// mid-word when only spaces between ASCII letters counted).
#[test]
fn space_free_runs_are_cut_at_character_boundaries() {
    use retrom3::data::tokenizer::FORCED_CUT_BYTES;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cjk: String =
        "北京是中国的首都。东京是日本的首都".repeat(FORCED_CUT_BYTES * 5 / 2 / 51 + 1);
    assert!(cjk.len() > 2 * FORCED_CUT_BYTES && !cjk.contains(' '));
    for dir in ["tiny-bert", "tiny-xlmr"] {
        let tok = TextTokenizer::from_dir(root.join(dir)).unwrap();
        let full = tok.inner().encode_fast(cjk.as_str(), false).unwrap();
        let full = full.get_ids();
        let got = tok.content_ids(&cjk).unwrap();
        if dir == "tiny-bert" {
            assert_eq!(got, full, "{dir}");
        } else {
            // Two cuts: a few ids around each may differ; the rest are the whole text's.
            assert!(
                got.len().abs_diff(full.len()) <= 8,
                "{dir}: {} vs {}",
                got.len(),
                full.len()
            );
            assert_eq!(got[..1000], full[..1000], "{dir}");
            assert_eq!(got[got.len() - 1000..], full[full.len() - 1000..], "{dir}");
        }
        for m in [8usize, 512, 8192] {
            let ids = tok.encode(&cjk, m).unwrap();
            assert_eq!(&ids[1..m - 1], &full[..m - 2], "{dir} m={m}");
        }
    }
    let words = ["привет", "мир", "данные", "Ελλάδα", "한국어", "тест"];
    let mut spaced = String::new();
    let mut i = 0;
    while spaced.len() < FORCED_CUT_BYTES * 5 / 2 {
        spaced.push_str(words[i % words.len()]);
        spaced.push(' ');
        i += 1;
    }
    for dir in ["tiny-bert", "tiny-xlmr"] {
        let tok = TextTokenizer::from_dir(root.join(dir)).unwrap();
        let full = tok.inner().encode_fast(spaced.as_str(), false).unwrap();
        assert_eq!(tok.content_ids(&spaced).unwrap(), full.get_ids(), "{dir}");
    }
}
