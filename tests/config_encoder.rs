//! `EncoderConfig`: parsing of XLM-R / BERT config.json, HF defaults, validation errors naming the
//! field, and the `to_hf_json` round trip.

use std::path::Path;

use retrom3::model::config::{EncoderConfig, ModelKind};
use retrom3::Error;
use serde_json::{json, Value};

/// BAAI/bge-m3's config.json (SPEC §1.1), verbatim field set.
const BGE_M3: &str = r#"{
  "_name_or_path": "",
  "architectures": ["XLMRobertaModel"],
  "attention_probs_dropout_prob": 0.1,
  "bos_token_id": 0,
  "classifier_dropout": null,
  "eos_token_id": 2,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "hidden_size": 1024,
  "initializer_range": 0.02,
  "intermediate_size": 4096,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 8194,
  "model_type": "xlm-roberta",
  "num_attention_heads": 16,
  "num_hidden_layers": 24,
  "output_past": true,
  "pad_token_id": 1,
  "position_embedding_type": "absolute",
  "torch_dtype": "float32",
  "transformers_version": "4.33.0",
  "type_vocab_size": 1,
  "use_cache": true,
  "vocab_size": 250002
}"#;

/// A MiniLM-style BERT config with only the required fields.
const BERT_MINIMAL: &str = r#"{
  "model_type": "bert",
  "vocab_size": 30522,
  "hidden_size": 384,
  "num_hidden_layers": 6,
  "num_attention_heads": 12,
  "intermediate_size": 1536,
  "max_position_embeddings": 512
}"#;

fn parse(s: &str) -> retrom3::Result<EncoderConfig> {
    EncoderConfig::from_json_str(s, Path::new("test/config.json"))
}

/// The bge-m3 config with `field` set to `value` (`Some`) or removed (`None`).
fn bge_with(field: &str, value: Option<Value>) -> String {
    let mut v: Value = serde_json::from_str(BGE_M3).unwrap();
    let obj = v.as_object_mut().unwrap();
    match value {
        Some(x) => {
            obj.insert(field.to_string(), x);
        }
        None => {
            obj.remove(field);
        }
    }
    v.to_string()
}

/// Asserts a Config error naming `field`, with the file in the message.
fn assert_config_err(r: retrom3::Result<EncoderConfig>, field: &str) {
    match r {
        Err(Error::Config { field: f, msg }) => {
            assert_eq!(f, field, "wrong field; msg = {msg}");
            assert!(
                msg.contains("test/config.json"),
                "message should name the file: {msg}"
            );
        }
        other => panic!("expected Error::Config for {field}, got {other:?}"),
    }
}

#[test]
fn parses_bge_m3() {
    let c = parse(BGE_M3).unwrap();
    assert_eq!(c.kind, ModelKind::XlmRoberta);
    assert_eq!(c.vocab_size, 250002);
    assert_eq!(c.hidden_size, 1024);
    assert_eq!(c.num_hidden_layers, 24);
    assert_eq!(c.num_attention_heads, 16);
    assert_eq!(c.intermediate_size, 4096);
    assert_eq!(c.hidden_act, "gelu");
    assert_eq!(c.layer_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 8194);
    assert_eq!(c.type_vocab_size, 1);
    assert_eq!(c.pad_token_id, 1);
    assert_eq!(c.hidden_dropout_prob, 0.1);
    assert_eq!(c.attention_probs_dropout_prob, 0.1);
    assert_eq!(c.initializer_range, 0.02);
    assert_eq!(c.position_embedding_type, "absolute");
    assert_eq!(c.head_dim(), 64);
    assert_eq!(c.position_offset(), 2);
    assert_eq!(c.max_tokens(), 8192);
}

#[test]
fn bert_takes_hf_defaults() {
    let c = parse(BERT_MINIMAL).unwrap();
    assert_eq!(c.kind, ModelKind::Bert);
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert_eq!(c.type_vocab_size, 2);
    assert_eq!(c.pad_token_id, 0);
    assert_eq!(c.hidden_act, "gelu");
    assert_eq!(c.hidden_dropout_prob, 0.1);
    assert_eq!(c.attention_probs_dropout_prob, 0.1);
    assert_eq!(c.initializer_range, 0.02);
    assert_eq!(c.position_embedding_type, "absolute");
    assert_eq!(c.head_dim(), 32);
    assert_eq!(c.position_offset(), 0);
    assert_eq!(c.max_tokens(), 512);
}

#[test]
fn xlmr_defaults_pad_to_one_and_null_means_absent() {
    let s = bge_with("pad_token_id", Some(Value::Null));
    assert_eq!(parse(&s).unwrap().pad_token_id, 1);
    let s = bge_with("layer_norm_eps", None);
    assert_eq!(parse(&s).unwrap().layer_norm_eps, 1e-12);
}

#[test]
fn roberta_and_camembert_are_xlmr() {
    for ty in ["roberta", "camembert"] {
        let c = parse(&bge_with("model_type", Some(json!(ty)))).unwrap();
        assert_eq!(c.kind, ModelKind::XlmRoberta);
    }
}

#[test]
fn unknown_model_type_names_the_field() {
    assert_config_err(
        parse(&bge_with("model_type", Some(json!("gpt2")))),
        "model_type",
    );
    assert_config_err(parse(&bge_with("model_type", None)), "model_type");
}

#[test]
fn missing_required_fields_name_the_field() {
    for field in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    ] {
        assert_config_err(parse(&bge_with(field, None)), field);
    }
}

#[test]
fn mistyped_fields_name_the_field() {
    assert_config_err(
        parse(&bge_with("hidden_size", Some(json!("1024")))),
        "hidden_size",
    );
    assert_config_err(
        parse(&bge_with("hidden_size", Some(json!(1024.5)))),
        "hidden_size",
    );
    assert_config_err(
        parse(&bge_with("vocab_size", Some(json!(-3)))),
        "vocab_size",
    );
    assert_config_err(
        parse(&bge_with("layer_norm_eps", Some(json!("1e-5")))),
        "layer_norm_eps",
    );
    assert_config_err(
        parse(&bge_with("layer_norm_eps", Some(json!(1e300)))),
        "layer_norm_eps",
    );
    assert_config_err(
        parse(&bge_with("pad_token_id", Some(json!(1u64 << 40)))),
        "pad_token_id",
    );
    assert_config_err(parse(&bge_with("hidden_act", Some(json!(3)))), "hidden_act");
}

#[test]
fn invalid_values_name_the_field() {
    assert_config_err(
        parse(&bge_with("num_attention_heads", Some(json!(15)))),
        "num_attention_heads",
    );
    assert_config_err(
        parse(&bge_with("num_attention_heads", Some(json!(0)))),
        "num_attention_heads",
    );
    assert_config_err(
        parse(&bge_with("hidden_size", Some(json!(0)))),
        "hidden_size",
    );
    assert_config_err(
        parse(&bge_with("type_vocab_size", Some(json!(0)))),
        "type_vocab_size",
    );
    assert_config_err(
        parse(&bge_with("layer_norm_eps", Some(json!(0.0)))),
        "layer_norm_eps",
    );
    assert_config_err(
        parse(&bge_with("layer_norm_eps", Some(json!(-1e-5)))),
        "layer_norm_eps",
    );
    assert_config_err(
        parse(&bge_with("hidden_dropout_prob", Some(json!(1.0)))),
        "hidden_dropout_prob",
    );
    assert_config_err(
        parse(&bge_with("attention_probs_dropout_prob", Some(json!(-0.1)))),
        "attention_probs_dropout_prob",
    );
    assert_config_err(
        parse(&bge_with("initializer_range", Some(json!(-0.02)))),
        "initializer_range",
    );
    assert_config_err(
        parse(&bge_with("max_position_embeddings", Some(json!(2)))),
        "max_position_embeddings",
    );
    // Every input holds its two special tokens: a table with room for one token is refused at
    // load (before: it loaded and every encode failed, blaming the caller's max_length).
    assert_config_err(
        parse(&bge_with("max_position_embeddings", Some(json!(3)))),
        "max_position_embeddings",
    );
    assert_eq!(
        parse(&bge_with("max_position_embeddings", Some(json!(4))))
            .unwrap()
            .max_tokens(),
        2
    );
    let mut bert: Value = serde_json::from_str(BERT_MINIMAL).unwrap();
    bert["max_position_embeddings"] = json!(1);
    assert_config_err(parse(&bert.to_string()), "max_position_embeddings");
    bert["max_position_embeddings"] = json!(2);
    assert_eq!(parse(&bert.to_string()).unwrap().max_tokens(), 2);
    assert_config_err(
        parse(&bge_with("pad_token_id", Some(json!(250002)))),
        "pad_token_id",
    );
    assert_config_err(
        parse(&bge_with(
            "position_embedding_type",
            Some(json!("relative_key")),
        )),
        "position_embedding_type",
    );
}

#[test]
fn only_exact_gelu_is_accepted() {
    for act in ["gelu_new", "relu", "gelu_pytorch_tanh", "GELU"] {
        let r = parse(&bge_with("hidden_act", Some(json!(act))));
        match &r {
            Err(Error::Config { field, msg }) => {
                assert_eq!(field, "hidden_act");
                assert!(
                    msg.contains(act) && msg.contains("gelu"),
                    "unclear message: {msg}"
                );
            }
            other => panic!("{act}: expected Error::Config, got {other:?}"),
        }
    }
}

#[test]
fn bad_json_is_a_format_error_naming_the_file() {
    for bad in ["{", "[1, 2]", "", "null"] {
        match parse(bad) {
            Err(Error::Format { path, .. }) => assert_eq!(path, Path::new("test/config.json")),
            other => panic!("{bad:?}: expected Error::Format, got {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_an_io_error_naming_the_file() {
    let p = Path::new("/nonexistent/retrom3/config.json");
    match EncoderConfig::from_file(p) {
        Err(Error::Io { path, .. }) => assert_eq!(path, p),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn to_hf_json_round_trips() {
    for c in [
        parse(BGE_M3).unwrap(),
        parse(BERT_MINIMAL).unwrap(),
        EncoderConfig::new_xlmr(1000, 64, 2, 4, 128, 66).unwrap(),
        EncoderConfig::new_bert(1000, 64, 2, 4, 128, 64).unwrap(),
    ] {
        let j = c.to_hf_json();
        let back = parse(&serde_json::to_string_pretty(&j).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}

#[test]
fn to_hf_json_has_what_transformers_needs() {
    let j = parse(BGE_M3).unwrap().to_hf_json();
    assert_eq!(j["architectures"], json!(["XLMRobertaModel"]));
    assert_eq!(j["model_type"], json!("xlm-roberta"));
    assert_eq!(j["torch_dtype"], json!("float32"));
    // The f64 of the shortest decimal form (1e-5), not the widened f32 (9.99999974737875e-6).
    assert_eq!(j["layer_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(j["hidden_dropout_prob"].as_f64(), Some(0.1));
    assert_eq!(j["initializer_range"].as_f64(), Some(0.02));
    for field in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "max_position_embeddings",
        "type_vocab_size",
        "pad_token_id",
        "attention_probs_dropout_prob",
        "position_embedding_type",
    ] {
        assert!(j.get(field).is_some(), "missing {field}");
    }
    let b = EncoderConfig::new_bert(30522, 768, 12, 12, 3072, 512)
        .unwrap()
        .to_hf_json();
    assert_eq!(b["architectures"], json!(["BertModel"]));
    assert_eq!(b["model_type"], json!("bert"));
}

#[test]
fn builders_validate() {
    let x = EncoderConfig::new_xlmr(250002, 1024, 24, 16, 4096, 8194).unwrap();
    assert_eq!(x.max_tokens(), 8192);
    assert_eq!(x.layer_norm_eps, 1e-5);
    assert_eq!(x.type_vocab_size, 1);
    assert_eq!(x.pad_token_id, 1);
    let b = EncoderConfig::new_bert(100, 32, 1, 2, 64, 16).unwrap();
    assert_eq!(
        (b.kind, b.pad_token_id, b.type_vocab_size),
        (ModelKind::Bert, 0, 2)
    );
    assert_eq!(b.layer_norm_eps, 1e-12);
    assert!(EncoderConfig::new_xlmr(100, 30, 1, 4, 64, 16).is_err());
    assert!(EncoderConfig::new_xlmr(100, 32, 1, 4, 64, 2).is_err());
    assert!(EncoderConfig::new_bert(0, 32, 1, 4, 64, 16).is_err());
    assert!(EncoderConfig::new_bert(100, 32, 0, 4, 64, 16).is_err());
}

#[test]
fn head_dim_never_divides_by_zero() {
    let mut c = EncoderConfig::new_bert(100, 32, 1, 2, 64, 16).unwrap();
    c.num_attention_heads = 0;
    assert_eq!(c.head_dim(), 0);
    assert!(c.validate().is_err());
}

/// Sizes whose parameter count overflows, or is past any real encoder, are refused when parsed
/// (a wrapped size sliced out of bounds, a huge one aborted on allocation).
#[test]
fn absurd_sizes_are_refused_before_any_allocation() {
    assert_config_err(
        parse(&bge_with("vocab_size", Some(json!(1_000_000_000_000u64)))),
        "parameters",
    );
    let mut c: Value =
        serde_json::from_str(&bge_with("vocab_size", Some(json!(1u64 << 34)))).unwrap();
    c["hidden_size"] = json!(2147483648u64);
    let e = parse(&c.to_string()).unwrap_err().to_string();
    assert!(e.contains("more than 2^64 parameters"), "{e}");
    // bge-m3 itself: 568M parameters, well inside.
    let c = parse(&bge_with("vocab_size", Some(json!(250002)))).unwrap();
    let n = c.parameter_count().unwrap();
    assert!((560_000_000..580_000_000).contains(&n), "{n}");
}
