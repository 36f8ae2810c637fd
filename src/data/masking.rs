//! RetroMAE masking (SPEC §6.2 with retrom3's decisions §10.1-10.3): encoder whole-word masking
//! with 80/10/10 replacement, decoder labels, the word index each key needs for the in-kernel
//! position-specific mask, and the `reference_compat` materialised masks of the reference code.

use super::rng::Rng;
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::encoder::EncoderInput;

/// Label value that the loss ignores.
pub const IGNORE: i64 = -100;

/// What masking needs to know about the vocabulary.
#[derive(Clone, Debug)]
pub struct MaskingVocab {
    pub cls: u32,
    pub eos: u32,
    pub pad: u32,
    pub mask: u32,
    /// `len(tokenizer)`: the range of random replacement ids.
    pub vocab_size: usize,
    /// Per id: the token starts a new word (SentencePiece "▁", WordPiece not "##", specials).
    pub word_start: Vec<bool>,
    /// Per id: a special token (never masked in the encoder; its own word).
    pub special: Vec<bool>,
    /// Per id: the token string is literally "\[CLS\]" or "\[SEP\]", the tokens the reference's
    /// whole-word masking skips (`reference_compat`; XLM-R's `<s>`/`</s>` are not among them).
    pub ref_skip: Vec<bool>,
    /// Per id: the token string starts with "##", which the reference joins to the previous
    /// candidate word (`reference_compat`).
    pub ref_continues: Vec<bool>,
}

impl MaskingVocab {
    /// A synthetic vocabulary of `n` ids (benchmarks, selftests, tests): XLM-R's specials
    /// (0 `<s>`, 1 `<pad>`, 2 `</s>`, 3 `<unk>`) and `<mask>` = n - 1; ids below 5 and those not
    /// divisible by 3 start a word, the others continue one.
    pub fn synthetic(n: usize) -> MaskingVocab {
        MaskingVocab {
            cls: 0,
            eos: 2,
            pad: 1,
            mask: n.saturating_sub(1) as u32,
            vocab_size: n,
            word_start: (0..n).map(|i| i < 5 || i % 3 != 0).collect(),
            special: (0..n).map(|i| i < 4 || i + 1 == n).collect(),
            ref_skip: vec![false; n],
            ref_continues: vec![false; n],
        }
    }

    /// Derive from a tokenizer, whose model says how its tokens form words
    /// ([`TextTokenizer::token_starts_word`]): WordPiece continuations carry "##", SentencePiece
    /// pieces start a word with "▁" (XLM-R's vocabulary also has a piece "###", a word start of
    /// its own there: guessing WordPiece from any "##" token made every XLM-R piece a word). Where
    /// the model gives no per-token answer (byte-level BPE, WordLevel) every token is its own
    /// word.
    pub fn from_tokenizer(tok: &TextTokenizer) -> Result<MaskingVocab> {
        let need = |v: Option<u32>, what: &str| {
            v.ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: the tokenizer has no {what} token",
                    tok.path().display()
                ))
            })
        };
        let (cls, eos, pad, mask) = (
            need(tok.cls_id(), "cls/<s>")?,
            need(tok.eos_id(), "sep/</s>")?,
            need(tok.pad_id(), "pad")?,
            need(tok.mask_id(), "mask")?,
        );
        let n = tok.vocab_size();
        let tokens: Vec<String> = (0..n as u32)
            .map(|i| tok.id_to_token(i).unwrap_or_default())
            .collect();
        let mut special = vec![false; n];
        for id in tok.special_ids().into_iter().chain([mask]) {
            if (id as usize) < n {
                special[id as usize] = true;
            }
        }
        let word_start = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| special[i] || tok.token_starts_word(t).unwrap_or(true))
            .collect();
        Ok(MaskingVocab {
            cls,
            eos,
            pad,
            mask,
            vocab_size: n,
            word_start,
            special,
            ref_skip: tokens
                .iter()
                .map(|t| t == "[CLS]" || t == "[SEP]")
                .collect(),
            ref_continues: tokens.iter().map(|t| t.starts_with("##")).collect(),
        })
    }

    fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    fn starts_word(&self, id: u32) -> bool {
        self.word_start.get(id as usize).copied().unwrap_or(true)
    }

    fn flag(v: &[bool], id: u32) -> bool {
        v.get(id as usize).copied().unwrap_or(false)
    }
}

/// Masking settings; the default is `pretrain`'s (p_enc 0.3, p_dec 0.5, paper semantics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskingConfig {
    /// Encoder mask ratio (paper 0.15-0.3; default 0.3). A double, as the reference's Python
    /// float: the mask count round(L·p) must round the same.
    pub p_enc: f64,
    /// Decoder mask ratio (paper 0.5-0.7; default 0.5).
    pub p_dec: f64,
    /// Reproduce the reference code (HF `_whole_word_mask`): every token but a literal
    /// "\[CLS\]"/"\[SEP\]" is a candidate, "##" tokens join the previous word and nothing else groups
    /// tokens (token level for XLM-R), specials are removed from the encoder mask afterwards and
    /// stay maskable in the decoder matrix, at most 512 masked tokens, K = min(L, 128)
    /// pre-sampled decoder masks with a fixed count each.
    pub reference_compat: bool,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        }
    }
}

/// One RetroMAE training batch.
#[derive(Clone, Debug)]
pub struct RetroMaeBatch {
    /// Encoder input: masked ids and attention mask.
    pub enc: EncoderInput,
    /// \[B*L\] original id at encoder-masked positions, IGNORE elsewhere.
    pub enc_labels: Vec<i64>,
    /// Decoder content-stream input: the original ids (same attention mask).
    pub dec: EncoderInput,
    /// \[B*L\] original ids except position 0 and the last real position; IGNORE on padding.
    pub dec_labels: Vec<i64>,
    /// \[B*L\] whole-word index of each position (the decoder mask hides whole words).
    pub words: Vec<u32>,
    /// Seed of the in-kernel decoder mask of this batch.
    pub mask_seed: u64,
    /// reference_compat only: the materialised [B, L, L] decoder visibility.
    pub dense_visibility: Option<Vec<u8>>,
}

/// Word index per position: a new word at every word-start token, every special token, and every
/// token right after a special.
fn word_ids(ids: &[u32], v: &MaskingVocab, token_level: bool) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut w = 0u32;
    for (i, &id) in ids.iter().enumerate() {
        let new = i == 0
            || token_level
            || v.starts_word(id)
            || v.is_special(id)
            || v.is_special(ids[i - 1]);
        if new && i > 0 {
            w += 1;
        }
        out.push(w);
    }
    out
}

/// The candidate words of retrom3's default masking: runs of equal word index among the
/// candidate positions.
fn candidate_words(words: &[u32], candidate: &[bool]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        if !candidate[i] {
            continue;
        }
        match groups.last_mut() {
            Some(g) if words[*g.last().expect("non-empty")] == w => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

/// The candidate words of the reference (HF `_whole_word_mask` on the token strings): every
/// position but a literal "\[CLS\]"/"\[SEP\]", a "##" token joining the previous candidate word.
fn reference_words(ids: &[u32], v: &MaskingVocab) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        if MaskingVocab::flag(&v.ref_skip, id) {
            continue;
        }
        match groups.last_mut() {
            Some(g) if MaskingVocab::flag(&v.ref_continues, id) => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

/// How many tokens a whole-word mask of ratio `p` takes from `l`: Python's
/// `min(cap, max(1, round(l * p)))`, halves to even as Python's `round`.
fn mask_count(l: usize, p: f64, cap: usize) -> usize {
    ((l as f64 * p).round_ties_even() as usize).clamp(1, cap)
}

/// HF `_whole_word_mask`: shuffle the candidate words, add whole words while the total stays
/// within [`mask_count`] (a word that would overshoot is skipped); a 0/1 vector of length `l`.
fn whole_word_mask(
    mut groups: Vec<Vec<usize>>,
    l: usize,
    p: f64,
    cap: usize,
    rng: &mut Rng,
) -> Vec<bool> {
    rng.shuffle(&mut groups);
    let n = mask_count(l, p, cap);
    let mut masked = vec![false; l];
    let mut count = 0;
    for g in groups {
        if count >= n {
            break;
        }
        if count + g.len() > n {
            continue;
        }
        for &i in &g {
            masked[i] = true;
        }
        count += g.len();
    }
    masked
}

/// Build one batch from documents of content ids (no specials; each gets `<s> … </s>`, truncated
/// to `max_len`). All randomness comes from `rng`.
pub fn make_batch(
    docs: &[&[u32]],
    v: &MaskingVocab,
    cfg: &MaskingConfig,
    max_len: usize,
    rng: &mut Rng,
) -> Result<RetroMaeBatch> {
    if max_len < 3 {
        return Err(Error::invalid(format!(
            "max_len {max_len}: RetroMAE needs at least 3 tokens"
        )));
    }
    let seqs: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| {
            let mut s = Vec::with_capacity(d.len().min(max_len - 2) + 2);
            s.push(v.cls);
            s.extend_from_slice(&d[..d.len().min(max_len - 2)]);
            s.push(v.eos);
            s
        })
        .collect();
    let dec = EncoderInput::pad(&seqs, v.pad);
    let (b, l) = (dec.batch, dec.len);
    let mut enc_ids = dec.ids.clone();
    let mut enc_labels = vec![IGNORE; b * l];
    let mut dec_labels = vec![IGNORE; b * l];
    let mut words = vec![0u32; b * l];
    let cap = if cfg.reference_compat {
        512
    } else {
        usize::MAX
    };
    for (bi, s) in seqs.iter().enumerate() {
        let n = s.len();
        let w = word_ids(s, v, cfg.reference_compat);
        words[bi * l..bi * l + n].copy_from_slice(&w);
        // Encoder: whole words of non-special tokens. Compat: the reference's words (specials
        // included unless literally [CLS]/[SEP]), the specials then removed from the mask as HF's
        // torch_mask_tokens does (so they use up part of the count).
        let groups = if cfg.reference_compat {
            reference_words(s, v)
        } else {
            let candidate: Vec<bool> = s.iter().map(|&id| !v.is_special(id)).collect();
            candidate_words(&w, &candidate)
        };
        let m = whole_word_mask(groups, n, cfg.p_enc, cap, rng);
        for (i, &mi) in m.iter().enumerate() {
            if !mi || v.is_special(s[i]) {
                continue;
            }
            let at = bi * l + i;
            enc_labels[at] = s[i] as i64;
            if rng.uniform() < 0.8 {
                enc_ids[at] = v.mask;
            } else if rng.uniform() < 0.5 {
                enc_ids[at] = rng.below(v.vocab_size) as u32;
            }
        }
        for i in 1..n.saturating_sub(1) {
            dec_labels[bi * l + i] = s[i] as i64;
        }
    }
    let mask_seed = rng.next_u64();
    let dense_visibility = cfg
        .reference_compat
        .then(|| reference_decoder_visibility(&seqs, v, l, cfg.p_dec, rng));
    Ok(RetroMaeBatch {
        enc: EncoderInput {
            ids: enc_ids,
            mask: dec.mask.clone(),
            batch: b,
            len: l,
        },
        enc_labels,
        dec,
        dec_labels,
        words,
        mask_seed,
        dense_visibility,
    })
}

/// The reference collator's decoder matrix: K = min(L, 128) whole-word masks of the reference's
/// words (token level for XLM-R, specials included) of ratio p (at most 512 tokens) pre-sampled
/// per example; each row picks one, hides itself, and sees the rest; padding rows and columns
/// are invisible. [B, Lpad, Lpad], 1 = visible.
fn reference_decoder_visibility(
    seqs: &[Vec<u32>],
    v: &MaskingVocab,
    lpad: usize,
    p: f64,
    rng: &mut Rng,
) -> Vec<u8> {
    let mut vis = vec![0u8; seqs.len() * lpad * lpad];
    for (bi, s) in seqs.iter().enumerate() {
        let n = s.len();
        let k = n.min(128);
        let words = reference_words(s, v);
        let masks: Vec<Vec<bool>> = (0..k)
            .map(|_| whole_word_mask(words.clone(), n, p, 512, rng))
            .collect();
        for i in 0..n {
            let m = &masks[rng.below(k)];
            for j in 0..n {
                let hidden = m[j] || j == i;
                vis[(bi * lpad + i) * lpad + j] = u8::from(!hidden);
            }
        }
    }
    vis
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> MaskingVocab {
        // ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, 4 <mask>; 5..=9 start words, 10..=14 continue.
        let n = 15;
        let special: Vec<bool> = (0..n).map(|i| i <= 4).collect();
        let word_start: Vec<bool> = (0..n).map(|i| i <= 9).collect();
        MaskingVocab {
            cls: 0,
            eos: 2,
            pad: 1,
            mask: 4,
            vocab_size: n,
            word_start,
            special,
            ref_skip: vec![false; n],
            ref_continues: vec![false; n],
        }
    }

    #[test]
    fn whole_words_are_masked_together_and_specials_never() {
        let v = vocab();
        let doc: Vec<u32> = vec![5, 10, 11, 6, 12, 7, 8, 13, 14, 9];
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        };
        for seed in 0..50 {
            let mut rng = Rng::new(seed, 0);
            let b = make_batch(&[&doc, &doc[..3]], &v, &cfg, 64, &mut rng).unwrap();
            let l = b.enc.len;
            assert_eq!(b.enc_labels[0], IGNORE);
            let masked: Vec<usize> = (0..l).filter(|&i| b.enc_labels[i] != IGNORE).collect();
            assert!(
                !masked.is_empty() && masked.len() <= 4,
                "round(12*0.3)=4: {masked:?}"
            );
            // Whole words: positions 1-3 (5,10,11) form one word, 4-5 (6,12) one, 7-9 (8,13,14).
            for word in [vec![1, 2, 3], vec![4, 5], vec![7, 8, 9]] {
                let k = word.iter().filter(|&&i| b.enc_labels[i] != IGNORE).count();
                assert!(
                    k == 0 || k == word.len(),
                    "seed {seed}: word {word:?} partially masked"
                );
            }
            assert_eq!(b.dec_labels[0], IGNORE);
            assert_eq!(b.dec_labels[11], IGNORE, "last real position");
            assert_eq!(b.dec_labels[1], 5);
            // Second example: <s> 5 10 11 </s> then padding.
            assert_eq!(&b.dec.ids[l..l + 5], &[0, 5, 10, 11, 2]);
            assert!(b.dec_labels[l + 5..2 * l].iter().all(|&x| x == IGNORE));
            assert_eq!(b.words[1], b.words[2]);
            assert_ne!(b.words[3], b.words[4]);
        }
    }

    #[test]
    fn replacement_is_80_10_10() {
        let v = vocab();
        let doc: Vec<u32> = (0..400).map(|i| 5 + (i % 5) as u32).collect();
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: false,
        };
        let (mut masked, mut as_mask, mut same) = (0, 0, 0);
        for seed in 0..20 {
            let b = make_batch(&[&doc], &v, &cfg, 512, &mut Rng::new(seed, 1)).unwrap();
            for i in 0..b.enc.len {
                if b.enc_labels[i] != IGNORE {
                    masked += 1;
                    as_mask += usize::from(b.enc.ids[i] == 4);
                    same += usize::from(b.enc.ids[i] as i64 == b.enc_labels[i]);
                }
            }
        }
        let f = as_mask as f64 / masked as f64;
        assert!((f - 0.8).abs() < 0.03, "mask fraction {f}");
        let s = same as f64 / masked as f64;
        assert!(
            s > 0.08 && s < 0.14,
            "unchanged fraction {s} (10% + random hits)"
        );
    }

    #[test]
    fn reference_compat_materialises_row_masks() {
        let v = vocab();
        let doc: Vec<u32> = vec![5, 6, 7, 8, 9, 5, 6];
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: true,
        };
        let b = make_batch(&[&doc, &doc[..2]], &v, &cfg, 64, &mut Rng::new(3, 0)).unwrap();
        let l = b.enc.len;
        let vis = b.dense_visibility.unwrap();
        for i in 0..l {
            assert_eq!(vis[i * l + i], 0, "row {i} sees itself");
            let hidden = (0..l).filter(|&j| vis[i * l + j] == 0).count();
            // Python's round(9 * 0.5) = 4 hidden positions, plus itself when not among them.
            assert!((4..=5).contains(&hidden), "row {i}: {hidden} hidden");
        }
        // Padding rows and columns of the short example are invisible.
        let off = l * l;
        assert!((0..l).all(|j| vis[off + 5 * l + j] == 0));
        assert!((0..l).all(|i| vis[off + i * l + 6] == 0));
    }

    #[test]
    fn mask_counts_round_as_python() {
        // Python 3: round(l * p) for these (l, p) (halves to even; p a double).
        for (l, p, want) in [
            (15, 0.3, 4),
            (9, 0.5, 4),
            (5, 0.3, 2),
            (25, 0.3, 8),
            (10, 0.25, 2),
            (7, 0.5, 4),
            (35, 0.3, 10),
            (45, 0.3, 14),
        ] {
            assert_eq!(mask_count(l, p, usize::MAX), want, "round({l} * {p})");
        }
        assert_eq!(mask_count(1, 0.3, 512), 1, "at least one");
        assert_eq!(mask_count(8192, 0.3, 512), 512, "the reference's cap");
    }

    /// A WordPiece vocabulary as the reference sees it: ids 0 [CLS], 1 [PAD], 2 [SEP], 3 [UNK],
    /// 4 [MASK]; 5..=9 whole tokens, 10..=14 "##" continuations.
    fn wordpiece_vocab() -> MaskingVocab {
        let mut v = vocab();
        v.ref_skip = (0..15).map(|i| i == 0 || i == 2).collect();
        v.ref_continues = (0..15).map(|i| i >= 10).collect();
        v
    }

    #[test]
    fn reference_compat_wordpiece_keeps_words_and_the_first_slot() {
        let v = wordpiece_vocab();
        // [CLS] 5 ##10 ##11 6 ##12 7 8 ##13 ##14 9 [SEP]: words {1,2,3} {4,5} {6} {7,8,9} {10}.
        let doc: Vec<u32> = vec![5, 10, 11, 6, 12, 7, 8, 13, 14, 9];
        let words = [vec![1, 2, 3], vec![4, 5], vec![7, 8, 9]];
        for p_dec in [0.5, 0.7] {
            let cfg = MaskingConfig {
                p_enc: 0.3,
                p_dec,
                reference_compat: true,
            };
            for seed in 0..20 {
                let b = make_batch(&[&doc], &v, &cfg, 64, &mut Rng::new(seed, 0)).unwrap();
                let l = b.enc.len;
                assert_eq!(l, 12);
                let vis = b.dense_visibility.unwrap();
                for i in 0..l {
                    // [CLS] and [SEP] are never candidates: hidden only from themselves.
                    for j in [0, l - 1] {
                        assert_eq!(
                            vis[i * l + j],
                            u8::from(i != j),
                            "seed {seed} row {i} col {j}"
                        );
                    }
                    // At most round(12 * p) tokens of whole words hidden besides the row itself;
                    // short by at most 2 (a 3-token word that does not fit) plus the row.
                    let hidden: Vec<usize> =
                        (0..l).filter(|&j| j != i && vis[i * l + j] == 0).collect();
                    let n = mask_count(12, p_dec, 512);
                    assert!(hidden.len() <= n && hidden.len() + 3 >= n, "{hidden:?}");
                    for w in &words {
                        let k = w.iter().filter(|&&j| j != i && vis[i * l + j] == 0).count();
                        let others = w.iter().filter(|&&j| j != i).count();
                        assert!(
                            k == 0 || k == others,
                            "seed {seed} row {i}: word {w:?} split"
                        );
                    }
                }
                // Encoder: round(12 * 0.3) = 4 tokens of whole words, never a special.
                let masked: Vec<usize> = (0..l).filter(|&i| b.enc_labels[i] != IGNORE).collect();
                assert!(!masked.is_empty() && masked.len() <= 4, "{masked:?}");
                assert!(!masked.contains(&0) && !masked.contains(&(l - 1)));
                for w in &words {
                    let k = w.iter().filter(|&&i| b.enc_labels[i] != IGNORE).count();
                    assert!(k == 0 || k == w.len(), "seed {seed}: word {w:?} split");
                }
            }
        }
    }

    #[test]
    fn reference_compat_xlmr_draws_specials_then_drops_them_from_the_encoder() {
        // XLM-R: `<s>`/`</s>` are not literally [CLS]/[SEP], so they are candidates: the decoder
        // hides the first slot from some rows, and the encoder's draw can pick a special (then
        // removed, as HF's torch_mask_tokens does), leaving fewer than round(L * p) labels.
        let v = MaskingVocab::synthetic(32);
        let doc: Vec<u32> = (5..15).collect();
        let cfg = MaskingConfig {
            p_enc: 0.3,
            p_dec: 0.5,
            reference_compat: true,
        };
        let (mut first_hidden, mut short_draws) = (0, 0);
        for seed in 0..40 {
            let b = make_batch(&[&doc], &v, &cfg, 64, &mut Rng::new(seed, 2)).unwrap();
            let l = b.enc.len;
            let vis = b.dense_visibility.unwrap();
            first_hidden += (1..l).filter(|&i| vis[i * l] == 0).count();
            let masked = (0..l).filter(|&i| b.enc_labels[i] != IGNORE).count();
            assert!(masked <= 4, "round(12 * 0.3) = 4");
            assert_eq!(b.enc_labels[0], IGNORE);
            assert_eq!(b.enc_labels[l - 1], IGNORE);
            short_draws += usize::from(masked < 4);
        }
        // Each row hides the first slot with probability 6/12 (one of 40 * 11 rows).
        assert!((150..290).contains(&first_hidden), "{first_hidden}");
        // A draw of 4 of the 12 positions misses both specials with probability C(10,4)/C(12,4)
        // = 0.42, so about 23 of the 40 draws come out short.
        assert!((10..36).contains(&short_draws), "{short_draws}");
    }

    #[test]
    fn reference_words_of_the_fixture_tokenizers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let bert = TextTokenizer::from_dir(dir.join("tiny-bert")).unwrap();
        let v = MaskingVocab::from_tokenizer(&bert).unwrap();
        let skipped: Vec<u32> = (0..v.vocab_size as u32)
            .filter(|&i| MaskingVocab::flag(&v.ref_skip, i))
            .collect();
        assert_eq!(skipped, vec![v.cls, v.eos], "[CLS] and [SEP] only");
        assert!(
            v.ref_continues.iter().any(|&c| c),
            "WordPiece has ## pieces"
        );
        let xlmr = TextTokenizer::from_dir(dir.join("tiny-xlmr")).unwrap();
        let v = MaskingVocab::from_tokenizer(&xlmr).unwrap();
        assert!(
            !v.ref_skip.iter().any(|&c| c),
            "<s> and </s> are candidates"
        );
    }

    /// The words the masking groups by token id are the tokenizer's own words (its model's
    /// scheme), for the WordPiece and SentencePiece fixtures and for a SentencePiece vocabulary
    /// that also holds a "###" piece (as XLM-R's 250,002 do: any "##" token once made every
    /// XLM-R piece a word of its own).
    #[test]
    fn masking_words_are_the_tokenizers_words() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // tiny-xlmr plus a likely "###" piece, written beside the test's other temporaries.
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tiny-xlmr/tokenizer.json")).unwrap(),
        )
        .unwrap();
        json["model"]["vocab"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(["###", -1.0]));
        let hashes = std::env::temp_dir().join(format!("r3-masking-words-{}", std::process::id()));
        std::fs::create_dir_all(&hashes).unwrap();
        std::fs::write(hashes.join("tokenizer.json"), json.to_string()).unwrap();
        let texts = [
            "the unbelievably long sentences, again!",
            "a### b ### c##d and ##e",
            "Zwei Wörter; drei? vier.",
        ];
        for name in [dir.join("tiny-bert"), dir.join("tiny-xlmr"), hashes.clone()] {
            let tok = TextTokenizer::from_dir(&name).unwrap();
            let v = MaskingVocab::from_tokenizer(&tok).unwrap();
            let (mut pairs, mut joins) = (0, 0);
            for text in texts {
                let (ids, words) = tok.encode_with_words(text, 128).unwrap();
                let ours = word_ids(&ids, &v, false);
                for i in 1..ids.len() {
                    if let (Some(a), Some(b)) = (words[i - 1], words[i]) {
                        pairs += 1;
                        joins += usize::from(a == b);
                        assert_eq!(
                            a != b,
                            ours[i - 1] != ours[i],
                            "{}: {text:?} at token {i} ({:?})",
                            name.display(),
                            tok.id_to_token(ids[i])
                        );
                    }
                }
            }
            assert!(
                joins > 0 && joins < pairs,
                "{}: words of several tokens",
                name.display()
            );
            if name == hashes {
                let id = tok.token_to_id("###").unwrap();
                assert!(
                    !v.starts_word(id),
                    "\"###\" continues a word in SentencePiece"
                );
            }
        }
        std::fs::remove_dir_all(&hashes).ok();
    }
}
