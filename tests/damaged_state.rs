//! Model files and training state that are damaged or inconsistent: clear errors naming the
//! file and tensor, never silent garbage (NaN outputs with exit 0, a layer dropped, a resume that
//! quietly trains another model or other settings).

use retrom3::data::m3_data::read_train_file;
use retrom3::data::TextTokenizer;
use retrom3::model::m3_train::M3Student;
use retrom3::model::retromae::RetroMae;
use retrom3::tensor::Tensor;
use retrom3::train::m3::{finetune, FinetuneConfig, M3TrainData};
use retrom3::train::optim::adamw_hyper;
use retrom3::train::{AdamW, TrainState};
use retrom3::{Device, EncodeOptions, EncoderConfig, Error, M3Model};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retrom3-damaged-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh temporary directory holding a copy of `src`'s files (not its subdirectories).
fn copy_of(src: &Path, tag: &str) -> PathBuf {
    let d = tmp(tag);
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    d
}

/// A copy of the tiny XLM-R model directory.
fn model_copy(tag: &str) -> PathBuf {
    copy_of(&fixture("tiny-xlmr"), tag)
}

fn set_backbone(dir: &Path, name: &str, f: impl Fn(&mut [f32])) {
    let (mut map, _) = retrom3::io::read_backbone(dir).unwrap();
    let t = map.remove(name).unwrap();
    let dims = t.dims().to_vec();
    let mut v = t.to_f32().into_f32_vec().unwrap();
    f(&mut v);
    map.insert(name.into(), Tensor::from_vec(v, &dims).unwrap());
    retrom3::io::write_backbone(dir, &map).unwrap();
}

#[test]
fn overflowing_weights_are_an_error_not_nan_outputs() {
    // Finite weights (the loader accepts them) whose hidden states overflow.
    let d = model_copy("overflow");
    set_backbone(&d, "embeddings.LayerNorm.weight", |v| v.fill(1e30));
    let m = M3Model::load(&d, Device::Cpu).unwrap();
    for opts in [
        EncodeOptions::default(),
        EncodeOptions {
            dense: false,
            sparse: true,
            ..Default::default()
        },
        EncodeOptions::all(),
    ] {
        match m.encode(&["a text", "another one"], &opts) {
            Err(e @ Error::NonFinite(_)) => {
                assert!(e.to_string().contains("overflow or hold NaN"), "{e}")
            }
            other => panic!("expected a non-finite error, got {other:?}"),
        }
    }
}

/// A non-finite hidden state names an input text, not a row of the length-sorted batch: the
/// batch is re-run one text at a time, longest first, so the first to fail here is the longest,
/// input text 2.
#[test]
fn a_non_finite_hidden_state_names_the_input_text() {
    let d = model_copy("overflow-named");
    set_backbone(&d, "embeddings.LayerNorm.weight", |v| v.fill(1e30));
    let m = M3Model::load(&d, Device::Cpu).unwrap();
    let texts = ["a", "a much longer text than the first one", "short"];
    for opts in [EncodeOptions::default(), EncodeOptions::all()] {
        match m.encode(&texts, &opts) {
            Err(e @ Error::NonFinite(_)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("input text 2:") && msg.contains("batch row 1"),
                    "{msg}"
                );
            }
            other => panic!("expected a non-finite error, got {other:?}"),
        }
    }
}

/// Outputs that are finite but too large for a score: encode succeeds (sparse weights ~1e37),
/// and the lexical score, a sum of their products, is refused as non-finite, naming the pair
/// (it was returned as inf).
#[test]
fn scores_that_overflow_are_an_error() {
    let d = model_copy("score-overflow");
    set_backbone(&d, "encoder.layer.1.output.LayerNorm.weight", |v| {
        v.iter_mut().for_each(|x| *x *= 1e37)
    });
    let m = M3Model::load(&d, Device::Cpu).unwrap();
    let texts = ["hello world this is a test", "hello world"];
    let enc = m
        .encode(
            &texts,
            &EncodeOptions {
                dense: false,
                sparse: true,
                ..Default::default()
            },
        )
        .unwrap();
    let weights = enc.sparse.unwrap();
    assert!(weights[1].iter().all(|&(_, w)| w.is_finite()));
    assert!(weights[1].iter().any(|&(_, w)| w > 1e30), "{weights:?}");
    let pairs = [("", texts[1]), (texts[0], texts[1])];
    match m.compute_score(&pairs, &Default::default()) {
        Err(e @ Error::NonFinite(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("sparse score of input pair 2"), "{msg}");
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    // The CLI names the line of the pairs file.
    let pairs = d.join("pairs.jsonl");
    let line = serde_json::json!({"query": texts[0], "passage": texts[1]});
    std::fs::write(&pairs, format!("{line}\n")).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
        .args(["score", "--model"])
        .arg(&d)
        .arg("--pairs")
        .arg(&pairs)
        .arg("--output")
        .arg(d.join("scores.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pairs.jsonl:1") && err.contains("not finite"),
        "{err}"
    );
    assert!(!d.join("scores.jsonl").exists());
}

#[test]
fn a_nan_in_a_head_file_names_the_file() {
    let d = model_copy("nanhead");
    let mut heads = retrom3::io::read_heads(&d, 32).unwrap().unwrap();
    let dims = heads.sparse_weight.dims().to_vec();
    let mut w = heads.sparse_weight.to_f32().into_f32_vec().unwrap();
    w[3] = f32::NAN;
    heads.sparse_weight = Tensor::from_vec(w, &dims).unwrap();
    retrom3::io::write_heads(&d, &heads).unwrap();
    let e = M3Model::load(&d, Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("sparse_linear.pt") && e.contains("weight") && e.contains("element 3"),
        "{e}"
    );
}

#[test]
fn more_layers_in_the_weights_than_in_the_config() {
    let d = model_copy("layers");
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let n = cfg["num_hidden_layers"].as_u64().unwrap();
    assert!(n >= 2);
    cfg["num_hidden_layers"] = (n - 1).into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = M3Model::load(&d, Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("num_hidden_layers") && e.contains(&format!("encoder.layer.{}", n - 1)),
        "{e}"
    );
}

/// A config that promises more layers than the weights hold is refused before the parameter
/// list is sized from it: one more layer names the count held, and a typo'd 10^12 (which used to
/// abort the process on the allocation) is refused by the config check.
#[test]
fn more_layers_in_the_config_than_in_the_weights() {
    let d = model_copy("fewer-layers");
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let n = cfg["num_hidden_layers"].as_u64().unwrap();
    for (layers, want) in [
        (n + 1, format!("holds {n} encoder layers")),
        (1_000_000_000_000, "more than 4096 layers".to_string()),
    ] {
        cfg["num_hidden_layers"] = layers.into();
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = M3Model::load(&d, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers") && e.contains(&want), "{e}");
    }
}

/// Weights whose keys carry an unknown prefix (`module.`, a DataParallel save) are named as such,
/// not blamed on config.json's layer count.
#[test]
fn an_unknown_key_prefix_is_named() {
    let d = model_copy("module-prefix");
    let p = d.join("model.safetensors");
    let map = retrom3::io::read_safetensors(&p).unwrap();
    let renamed = map
        .into_iter()
        .map(|(k, t)| (format!("module.{k}"), t))
        .collect();
    retrom3::io::write_safetensors(&p, &renamed, None).unwrap();
    let e = M3Model::load(&d, Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("prefix \"module.\""),
        "{e}"
    );
}

/// A post-processor special id past the embedding table is refused at load, naming
/// tokenizer.json (every encode failed with "token id 1500 >= vocab size", naming no file).
#[test]
fn a_post_processor_id_outside_the_table_names_the_tokenizer() {
    let d = model_copy("template-id");
    let p = d.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // The pair template's middle separator is a token of its own, id 1500.
    let pp = &mut t["post_processor"];
    pp["special_tokens"]["<sep2>"] =
        serde_json::json!({"id": "<sep2>", "ids": [1500], "tokens": ["<sep2>"]});
    pp["pair"][3] = serde_json::json!({"SpecialToken": {"id": "<sep2>", "type_id": 0}});
    std::fs::write(&p, t.to_string()).unwrap();
    let e = M3Model::load(&d, Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("token id 1500") && e.contains("vocab_size"),
        "{e}"
    );
}

/// A tokenizer.json whose post-processor does not wrap a text in `<s> ... </s>` is refused when
/// it loads, naming the file: without it the first word became the dense vector and left the
/// sparse and ColBERT outputs, and an empty text failed as a caller's error.
#[test]
fn a_post_processor_that_adds_no_specials_is_refused() {
    let cases: [(&str, serde_json::Value); 2] = [
        ("null", serde_json::Value::Null),
        // Only the separator.
        (
            "no-cls",
            serde_json::json!({"type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}),
        ),
    ];
    for (tag, pp) in cases {
        let d = model_copy(&format!("no-specials-{tag}"));
        let p = d.join("tokenizer.json");
        let mut t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        t["post_processor"] = pp;
        std::fs::write(&p, t.to_string()).unwrap();
        let e = M3Model::load(&d, Device::Cpu).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Format { .. })
                && msg.contains("tokenizer.json")
                && msg.contains("post_processor"),
            "{tag}: {msg}"
        );
        // Fine-tuning refuses it too; tokenize and pretrain, which add the specials themselves,
        // load it.
        let tok = TextTokenizer::from_dir(&d).unwrap();
        let e = tok.check_wraps_texts().unwrap_err();
        assert!(e.to_string().contains("post_processor"), "{tag}: {e}");
        let ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
        let mut student = M3Student::load_dir(&fixture("tiny-xlmr"), 0).unwrap();
        let e = finetune(
            &mut student,
            &M3TrainData::single(ex, 2),
            &tok,
            &FinetuneConfig {
                steps: Some(1),
                ..Default::default()
            },
            &d,
            &tmp(&format!("no-specials-ft-{tag}")),
            None,
            &mut |_, _, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("post_processor"), "{tag}: {e}");
    }
}

/// A BERT vocabulary that also holds "<s>" and "</s>" as word pieces: the sentence token and the
/// separator are the [CLS] / [SEP] its post-processor adds, not the pieces of those names.
#[test]
fn the_specials_are_the_post_processors() {
    let d = tmp("bert-with-s-pieces");
    let p = d.join("tokenizer.json");
    std::fs::copy(fixture("tiny-bert").join("tokenizer.json"), &p).unwrap();
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let n = vocab.len() as u64;
    vocab.insert("<s>".into(), n.into());
    vocab.insert("</s>".into(), (n + 1).into());
    std::fs::write(&p, t.to_string()).unwrap();
    let tok = TextTokenizer::from_dir(&d).unwrap();
    let ids = tok.encode("", 8).unwrap();
    assert_eq!((tok.cls_id(), tok.eos_id()), (Some(ids[0]), Some(ids[1])));
    assert_eq!(tok.id_to_token(ids[0]).as_deref(), Some("[CLS]"));
    tok.check_wraps_texts().unwrap();
}

/// A model path that is a file is named as such (it used to say "model directory not found").
#[test]
fn a_file_given_as_the_model_directory() {
    let e = M3Model::load(fixture("tiny-xlmr").join("config.json"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
}

/// A sentence-transformers max_seq_length that leaves no room for the two special tokens is a
/// format error at load (it used to load, then fail every default encode blaming max_length).
#[test]
fn sentence_transformers_max_length_below_two() {
    let d = model_copy("st-max0");
    std::fs::write(
        d.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 0}"#,
    )
    .unwrap();
    let e = M3Model::load(&d, Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("sentence_bert_config.json") && e.contains(">= 2"),
        "{e}"
    );
}

/// Score lengths over the model's are refused naming the option that was set.
#[test]
fn score_lengths_name_their_field() {
    let m = M3Model::load(fixture("tiny-xlmr"), Device::Cpu).unwrap();
    for (field, q, p) in [
        ("max_query_length", m.max_length + 1, 8),
        ("max_passage_length", 8, 1),
    ] {
        let opts = retrom3::ScoreOptions {
            max_query_length: Some(q),
            max_passage_length: Some(p),
            ..Default::default()
        };
        let e = m
            .compute_score(&[("q", "p")], &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{e}");
    }
}

fn ft_config(steps: u64) -> FinetuneConfig {
    FinetuneConfig {
        steps: Some(steps),
        batch_size: 3,
        group_size: 4,
        query_max_len: 16,
        passage_max_len: 24,
        self_distill_start_step: 0,
        lr: 5e-4,
        // 0.03 as f32 does not survive a JSON round trip as a number: the recorded settings
        // must still match on resume.
        weight_decay: 0.03,
        seed: 3,
        save_every: Some(2),
        ..Default::default()
    }
}

fn run_ft(
    cfg: &FinetuneConfig,
    out: &Path,
    resume: Option<&Path>,
) -> retrom3::Result<Vec<retrom3::train::m3::StepLosses>> {
    run_ft_edited(cfg, out, resume, |_| {})
}

/// [`run_ft`] on the fixture's rows after `edit`.
fn run_ft_edited(
    cfg: &FinetuneConfig,
    out: &Path,
    resume: Option<&Path>,
    edit: impl Fn(&mut Vec<retrom3::data::m3_data::TrainExample>),
) -> retrom3::Result<Vec<retrom3::train::m3::StepLosses>> {
    let dir = fixture("tiny-xlmr");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let mut ex = read_train_file(&fixture("m3-train/train.jsonl")).unwrap();
    edit(&mut ex);
    let (mut m, state) = match resume {
        Some(ck) => {
            let m = M3Student::load_dir(ck, cfg.seed).unwrap();
            let state = TrainState::load(ck).unwrap();
            let hyper = adamw_hyper(cfg.lr, cfg.weight_decay);
            let mut opt = AdamW::new(m.params.specs(), hyper, cfg.max_grad_norm);
            opt.load_dir(ck, m.params.specs(), state.step).unwrap();
            (m, Some((state, opt)))
        }
        None => (M3Student::load_dir(&dir, cfg.seed).unwrap(), None),
    };
    finetune(
        &mut m,
        &M3TrainData::single(ex, 3),
        &tok,
        cfg,
        &dir,
        out,
        state,
        &mut |_, _, _| {},
    )
}

#[test]
fn bad_schedule_settings_are_refused_before_training() {
    let out = tmp("sched");
    for (what, f) in [
        (
            "--lr",
            Box::new(|c: &mut FinetuneConfig| c.lr = f32::NAN) as Box<dyn Fn(&mut _)>,
        ),
        ("--lr", Box::new(|c: &mut FinetuneConfig| c.lr = -1.0)),
        (
            "--warmup-ratio",
            Box::new(|c: &mut FinetuneConfig| c.warmup_ratio = 5.0),
        ),
        (
            "--weight-decay",
            Box::new(|c: &mut FinetuneConfig| c.weight_decay = f32::NAN),
        ),
        (
            "--max-grad-norm",
            Box::new(|c: &mut FinetuneConfig| c.max_grad_norm = Some(-1.0)),
        ),
        (
            "--steps",
            Box::new(|c: &mut FinetuneConfig| c.steps = Some(0)),
        ),
    ] {
        let mut cfg = ft_config(2);
        f(&mut cfg);
        let e = run_ft(&cfg, &out, None).unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
        assert!(!out.join("checkpoint-2").exists() && !out.join("model.safetensors").exists());
    }
}

#[test]
fn a_resume_with_other_settings_or_past_its_end_is_refused() {
    let out = tmp("resume");
    run_ft(&ft_config(4), &out, None).unwrap();
    let ck = out.join("checkpoint-2");
    let state = TrainState::load(&ck).unwrap();
    assert_eq!(
        state.args["group_size"], 4,
        "settings recorded: {}",
        state.args
    );
    // Another learning rate.
    let mut cfg = ft_config(4);
    cfg.lr = 1e-3;
    let e = run_ft(&cfg, &tmp("resume-lr"), Some(&ck))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr: checkpoint"), "{e}");
    // Other data: one text moved from a row's negatives to its positives.
    let e = run_ft_edited(&ft_config(4), &tmp("resume-data"), Some(&ck), |ex| {
        let n = ex[0].neg.pop().unwrap();
        ex[0].pos.push(n);
        ex[0].pos_scores = None;
        ex[0].neg_scores = None;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("data: checkpoint"), "{e}");
    // Fewer steps than the checkpoint has done.
    let e = run_ft(&ft_config(1), &tmp("resume-end"), Some(&ck))
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoint is at step 2"), "{e}");
    // The same settings continue (and more steps are allowed).
    let out2 = tmp("resume-ok");
    let r = run_ft(&ft_config(5), &out2, Some(&ck)).unwrap();
    assert_eq!(r.first().map(|s| s.0), Some(3));
}

#[test]
fn resuming_into_the_same_directory_keeps_one_metrics_row_per_step() {
    let out = tmp("metrics");
    run_ft(&ft_config(4), &out, None).unwrap();
    // An earlier attempt got to step 4; resuming at 2 into the same directory redoes 3 and 4.
    let ck = copy_of(&out.join("checkpoint-2"), "metrics-ck");
    run_ft(&ft_config(4), &out, Some(&ck)).unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    // A fresh run into the directory starts a fresh log.
    run_ft(&ft_config(1), &out, None).unwrap();
    let n = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, 1);
}

#[test]
fn a_resume_directory_must_be_the_named_model_and_complete() {
    let x = fixture("tiny-xlmr");
    let b = fixture("tiny-bert");
    retrom3::train::check_resume_model(&x, &x.join("config.json")).unwrap();
    let e = retrom3::train::check_resume_model(&b, &x.join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume") && e.contains("Bert"), "{e}");
    // A RetroMAE checkpoint without its LM head / decoder file.
    let cfg = EncoderConfig::from_file(x.join("config.json")).unwrap();
    let e = RetroMae::read_heads(&x, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("retromae_heads.safetensors") && e.contains("missing"),
        "{e}"
    );
    // An optimizer state with a NaN moment names the file and tensor.
    let out = tmp("nanopt");
    run_ft(&ft_config(2), &out, None).unwrap();
    let p = out.join("optimizer.safetensors");
    let mut map = retrom3::io::read_safetensors(&p).unwrap();
    let key = map.keys().next().unwrap().clone();
    let t = map.remove(&key).unwrap();
    let dims = t.dims().to_vec();
    let mut v = t.to_f32().into_f32_vec().unwrap();
    v[0] = f32::NAN;
    map.insert(key.clone(), Tensor::from_vec(v, &dims).unwrap());
    retrom3::io::write_safetensors(&p, &map, None).unwrap();
    let m = M3Student::load_dir(&out, 3).unwrap();
    let mut opt = AdamW::new(m.params.specs(), adamw_hyper(1e-4, 0.0), None);
    let e = opt
        .load_dir(&out, m.params.specs(), 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains(&key),
        "{e}"
    );
    // A negative second moment (its square root is NaN a step later), and a moment of another
    // shape: both name the file and the tensor.
    let edit = |f: &dyn Fn(&str, Tensor) -> Tensor| {
        let mut map = retrom3::io::read_safetensors(&p).unwrap();
        map.insert(key.clone(), f(&key, map[&key].clone()));
        let sq = map
            .keys()
            .find(|k| k.starts_with("exp_avg_sq."))
            .unwrap()
            .clone();
        map.insert(sq.clone(), f(&sq, map[&sq].clone()));
        retrom3::io::write_safetensors(&p, &map, None).unwrap();
        let mut opt = AdamW::new(m.params.specs(), adamw_hyper(1e-4, 0.0), None);
        let e = opt
            .load_dir(&out, m.params.specs(), 2)
            .unwrap_err()
            .to_string();
        (e, sq)
    };
    let (e, sq) = edit(&|k: &str, t: Tensor| {
        let dims = t.dims().to_vec();
        let mut v = t.to_f32().into_f32_vec().unwrap();
        v.iter_mut().for_each(|x| {
            *x = if k.starts_with("exp_avg_sq.") {
                -1.0
            } else {
                0.0
            }
        });
        Tensor::from_vec(v, &dims).unwrap()
    });
    assert!(
        e.contains("optimizer.safetensors") && e.contains(&sq) && e.contains("negative"),
        "{e}"
    );
    let (e, _) = edit(&|_: &str, _: Tensor| Tensor::from_vec(vec![0.0f32; 3], &[3]).unwrap());
    assert!(e.contains("optimizer.safetensors"), "{e}");
}

#[test]
fn cli_resume_from_a_non_checkpoint_and_zero_sizes_are_clear() {
    let out = tmp("cli");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_retrom3"))
            .args(["finetune", "--model"])
            .arg(fixture("tiny-xlmr"))
            .arg("--train")
            .arg(fixture("m3-train/train.jsonl"))
            .arg("--output")
            .arg(&out)
            .args([
                "--steps",
                "1",
                "--query-max-len",
                "16",
                "--passage-max-len",
                "16",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, err) = run(&["--resume", "/nonexistent/checkpoint-3"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a checkpoint directory"), "{err}");
    let (code, err) = run(&["--batch-size", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--batch-size 0"), "{err}");
    let (code, err) = run(&["--lr", "nan"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--lr NaN"), "{err}");
    let (code, err) = run(&["--self-distill-start-step", "-2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("must be >= -1"), "{err}");
    assert!(!out.join("model.safetensors").exists());
}

/// A checkpoint records its files' digests: a byte flipped anywhere in the model or optimizer
/// file (one a safetensors reader cannot see: inside a tensor) or a missing file is refused by
/// name when the checkpoint is loaded, and a damaged copy of the metrics log is reported.
#[test]
fn a_damaged_checkpoint_file_is_refused_by_name() {
    let out = tmp("digests");
    run_ft(&ft_config(3), &out, None).unwrap();
    let ck = out.join("checkpoint-2");
    let state = TrainState::load(&ck).unwrap();
    for f in ["model.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(
            state.files.contains_key(f),
            "{f} not recorded: {:?}",
            state.files
        );
    }
    assert!(!state.files.contains_key("trainer_state.json"));
    assert!(!state.log_copy_damaged());
    // The final directory (resumable too) records its files as well.
    assert!(TrainState::load(&out)
        .unwrap()
        .files
        .contains_key("model.safetensors"));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let d = copy_of(&ck, &format!("digests-{f}"));
        let p = d.join(f);
        let mut b = std::fs::read(&p).unwrap();
        let at = b.len() - 5;
        b[at] ^= 0x01;
        std::fs::write(&p, &b).unwrap();
        let e = TrainState::load(&d).unwrap_err().to_string();
        assert!(e.contains(f) && e.contains("damaged"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = TrainState::load(&d).unwrap_err().to_string();
        assert!(e.contains(f) && e.contains("missing"), "{e}");
    }
    // The log copy: one row edited.
    let d = copy_of(&ck, "digests-log");
    let log = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    std::fs::write(
        d.join("metrics.jsonl"),
        log.replacen("\"step\":1,", "\"step\":11,", 1),
    )
    .unwrap();
    assert!(TrainState::load(&d).unwrap().log_copy_damaged());
}
