//! Model configuration: the encoder's `config.json` (BERT / XLM-RoBERTa) and the sentence-transformers
//! side files (`sentence_bert_config.json`, `modules.json`, `1_Pooling/config.json`).
//!
//! Parsing is strict where a silent default would build a model of the wrong shape (the size fields
//! and `model_type` are required) and follows transformers' defaults for everything else
//! (`layer_norm_eps`, `type_vocab_size`, `pad_token_id`, dropouts, ...). Every problem is reported as
//! [`Error::Config`] naming the field and the file.

use std::fmt;
use std::path::{Component, Path};
use std::str::FromStr;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The encoder family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// XLM-RoBERTa (also `roberta` and `camembert`, which share the architecture): position ids
    /// start at `pad_token_id + 1` (the RoBERTa padding-offset convention, SPEC §1.2).
    XlmRoberta,
    /// BERT: position ids start at 0.
    Bert,
}

impl ModelKind {
    /// Maps a transformers `model_type` to a kind; unknown types are an [`Error::Config`].
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            "xlm-roberta" | "roberta" | "camembert" => Ok(ModelKind::XlmRoberta),
            "bert" => Ok(ModelKind::Bert),
            other => Err(Error::Config {
                field: "model_type".into(),
                msg: unsupported_model_type(other),
            }),
        }
    }

    /// The `model_type` written to config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            ModelKind::XlmRoberta => "xlm-roberta",
            ModelKind::Bert => "bert",
        }
    }

    /// The transformers class written to config.json's `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            ModelKind::XlmRoberta => "XLMRobertaModel",
            ModelKind::Bert => "BertModel",
        }
    }
}

fn unsupported_model_type(model_type: &str) -> String {
    format!(
        "unsupported model_type {model_type:?} (expected \"xlm-roberta\", \"roberta\", \"camembert\" \
         or \"bert\")"
    )
}

/// The most parameters a config may describe (2^34, 17e9): past it a size is a typo.
pub const MAX_PARAMETERS: u64 = 1 << 34;

/// The most encoder layers a config may declare.
pub const MAX_LAYERS: usize = 4096;

/// The encoder hyper-parameters of a BERT / XLM-RoBERTa `config.json` (SPEC §1.1).
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Architecture family (decides the position-id convention).
    pub kind: ModelKind,
    /// Rows of the word-embedding table (250002 for bge-m3).
    pub vocab_size: usize,
    /// Model width (1024 for bge-m3).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Activation of the feed-forward block; only `"gelu"` (the exact erf form) is supported.
    pub hidden_act: String,
    /// LayerNorm epsilon (1e-5 for XLM-R checkpoints, 1e-12 for BERT).
    pub layer_norm_eps: f32,
    /// Rows of the position-embedding table (8194 for bge-m3).
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (1 for XLM-R, 2 for BERT).
    pub type_vocab_size: usize,
    /// The padding id (1 for XLM-R, 0 for BERT); also the RoBERTa `padding_idx` of the positions.
    pub pad_token_id: u32,
    /// Dropout after embeddings, attention output and feed-forward output.
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f32,
    /// Standard deviation of the normal initialisation of fresh weights.
    pub initializer_range: f32,
    /// Only `"absolute"` is supported.
    pub position_embedding_type: String,
}

/// Builds an [`Error::Config`] for `field` that also names the file.
fn config_err(field: &str, path: &Path, msg: impl fmt::Display) -> Error {
    Error::Config {
        field: field.to_string(),
        msg: format!("{msg} (in {})", path.display()),
    }
}

/// Typed, field-naming access to a JSON object; `null` counts as absent.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn required<T>(
        &self,
        field: &str,
        parse: impl Fn(&Self, &str) -> Result<Option<T>>,
    ) -> Result<T> {
        parse(self, field)?.ok_or_else(|| config_err(field, self.path, "missing (required)"))
    }

    /// An integer field that fits `T` (`usize`, `u32`).
    fn int<T: TryFrom<u64>>(&self, field: &str) -> Result<Option<T>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let n = v.as_u64().and_then(|n| T::try_from(n).ok());
        n.map(Some).ok_or_else(|| {
            let msg = format!("expected a non-negative integer in range, got {v}");
            config_err(field, self.path, msg)
        })
    }

    fn f32(&self, field: &str) -> Result<Option<f32>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && (x as f32).is_finite() => Ok(Some(x as f32)),
            _ => Err(config_err(
                field,
                self.path,
                format!("expected a finite number, got {v}"),
            )),
        }
    }

    fn string(&self, field: &str) -> Result<Option<String>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        v.as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| config_err(field, self.path, format!("expected a string, got {v}")))
    }
}

/// An f32 as the JSON number of its shortest decimal form (1e-5, not 9.999999747378752e-6).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

impl EncoderConfig {
    /// Reads and validates a transformers `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path_for_errors` only labels errors.
    ///
    /// Required: `model_type`, `vocab_size`, `hidden_size`, `num_hidden_layers`,
    /// `num_attention_heads`, `intermediate_size`, `max_position_embeddings`. The other fields take
    /// transformers' defaults when absent or `null` (BertConfig / XLMRobertaConfig: `hidden_act`
    /// "gelu", `layer_norm_eps` 1e-12, `type_vocab_size` 2, dropouts 0.1, `initializer_range` 0.02,
    /// `position_embedding_type` "absolute", `pad_token_id` 0 for BERT and 1 for XLM-R).
    /// Unknown fields (`bos_token_id`, `use_cache`, ...) are ignored.
    pub fn from_json_str(s: &str, path_for_errors: impl AsRef<Path>) -> Result<Self> {
        let path = path_for_errors.as_ref();
        let value: Value = serde_json::from_str(s)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::format(path, "config.json must hold a JSON object"))?;
        let f = Fields { obj, path };

        let model_type = f.required("model_type", Fields::string)?;
        let kind = ModelKind::from_model_type(&model_type)
            .map_err(|_| config_err("model_type", path, unsupported_model_type(&model_type)))?;
        let default_pad = match kind {
            ModelKind::XlmRoberta => 1,
            ModelKind::Bert => 0,
        };
        let config = EncoderConfig {
            kind,
            vocab_size: f.required("vocab_size", Fields::int)?,
            hidden_size: f.required("hidden_size", Fields::int)?,
            num_hidden_layers: f.required("num_hidden_layers", Fields::int)?,
            num_attention_heads: f.required("num_attention_heads", Fields::int)?,
            intermediate_size: f.required("intermediate_size", Fields::int)?,
            hidden_act: f.string("hidden_act")?.unwrap_or_else(|| "gelu".into()),
            layer_norm_eps: f.f32("layer_norm_eps")?.unwrap_or(1e-12),
            max_position_embeddings: f.required("max_position_embeddings", Fields::int)?,
            type_vocab_size: f.int("type_vocab_size")?.unwrap_or(2),
            pad_token_id: f.int("pad_token_id")?.unwrap_or(default_pad),
            hidden_dropout_prob: f.f32("hidden_dropout_prob")?.unwrap_or(0.1),
            attention_probs_dropout_prob: f.f32("attention_probs_dropout_prob")?.unwrap_or(0.1),
            initializer_range: f.f32("initializer_range")?.unwrap_or(0.02),
            position_embedding_type: f
                .string("position_embedding_type")?
                .unwrap_or_else(|| "absolute".into()),
        };
        config.validate_at(path)?;
        Ok(config)
    }

    /// The encoder's parameter count (embeddings, layers, pooler), `None` when it overflows.
    pub fn parameter_count(&self) -> Option<u64> {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let rows = (self.vocab_size as u64)
            .checked_add(self.max_position_embeddings as u64)?
            .checked_add(self.type_vocab_size as u64)?;
        let emb = rows.checked_mul(h)?.checked_add(h.checked_mul(2)?)?;
        // Q, K, V, O (+ biases), FFN in and out (+ biases), two LayerNorms.
        let layer = h
            .checked_mul(h)?
            .checked_mul(4)?
            .checked_add(h.checked_mul(i)?.checked_mul(2)?)?
            .checked_add(h.checked_mul(9)?)?
            .checked_add(i)?;
        let pooler = h.checked_mul(h)?.checked_add(h)?;
        layer
            .checked_mul(self.num_hidden_layers as u64)?
            .checked_add(emb)?
            .checked_add(pooler)
    }

    /// Checks every invariant the model relies on; errors name the field (at most
    /// [`MAX_LAYERS`] layers and [`MAX_PARAMETERS`] parameters).
    pub fn validate(&self) -> Result<()> {
        self.validate_at(Path::new("<EncoderConfig>"))
    }

    fn validate_at(&self, path: &Path) -> Result<()> {
        let (eps, init) = (self.layer_norm_eps, self.initializer_range);
        let prob = |p: f32| (0.0..1.0).contains(&p);
        // (field, holds, message), checked in order; every check is safe to evaluate on any values.
        let params = self.parameter_count();
        let checks = [
            ("vocab_size", self.vocab_size > 0, "must be > 0".to_string()),
            ("hidden_size", self.hidden_size > 0, "must be > 0".into()),
            (
                "num_hidden_layers",
                self.num_hidden_layers > 0,
                "must be > 0".into(),
            ),
            (
                // A typo'd count would otherwise size the parameter list before any tensor is
                // read (10^12 layers: an allocation abort, not an error).
                "num_hidden_layers",
                self.num_hidden_layers <= MAX_LAYERS,
                format!(
                    "{} is more than {MAX_LAYERS} layers (no BERT / XLM-RoBERTa has that many)",
                    self.num_hidden_layers
                ),
            ),
            (
                "num_attention_heads",
                self.num_attention_heads > 0,
                "must be > 0".into(),
            ),
            (
                "intermediate_size",
                self.intermediate_size > 0,
                "must be > 0".into(),
            ),
            (
                "max_position_embeddings",
                self.max_position_embeddings > 0,
                "must be > 0".into(),
            ),
            (
                "type_vocab_size",
                self.type_vocab_size > 0,
                "must be > 0".into(),
            ),
            (
                // Sizes whose tensors overflow (or would take terabytes) are typos: an error
                // here, not a wrapped size or an allocation abort when the model is built.
                "parameters",
                params.is_some_and(|n| n <= MAX_PARAMETERS),
                format!(
                    "vocab_size {}, hidden_size {}, intermediate_size {}, \
                     max_position_embeddings {}, {} layers: {} parameters, above {MAX_PARAMETERS} \
                     (the largest XLM-R has 10.7e9)",
                    self.vocab_size,
                    self.hidden_size,
                    self.intermediate_size,
                    self.max_position_embeddings,
                    self.num_hidden_layers,
                    params.map_or("more than 2^64".to_string(), |n| n.to_string())
                ),
            ),
            (
                "num_attention_heads",
                self.hidden_size.checked_rem(self.num_attention_heads) == Some(0),
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ),
            (
                "hidden_act",
                self.hidden_act == "gelu",
                format!(
                    "{:?} is not supported; only \"gelu\" (the exact erf GELU) is implemented",
                    self.hidden_act
                ),
            ),
            (
                "position_embedding_type",
                self.position_embedding_type == "absolute",
                format!(
                    "{:?} is not supported; only \"absolute\"",
                    self.position_embedding_type
                ),
            ),
            (
                "layer_norm_eps",
                eps.is_finite() && eps > 0.0,
                format!("must be > 0, got {eps}"),
            ),
            (
                "hidden_dropout_prob",
                prob(self.hidden_dropout_prob),
                format!("must be in [0, 1), got {}", self.hidden_dropout_prob),
            ),
            (
                "attention_probs_dropout_prob",
                prob(self.attention_probs_dropout_prob),
                format!(
                    "must be in [0, 1), got {}",
                    self.attention_probs_dropout_prob
                ),
            ),
            (
                "initializer_range",
                init.is_finite() && init >= 0.0,
                format!("must be >= 0, got {init}"),
            ),
            (
                "pad_token_id",
                (self.pad_token_id as usize) < self.vocab_size,
                format!(
                    "{} is outside the vocabulary (vocab_size {})",
                    self.pad_token_id, self.vocab_size
                ),
            ),
            (
                // Real tokens start at row pad_token_id + 1; every input holds at least the two
                // special tokens, so the table needs two such rows.
                "max_position_embeddings",
                self.max_tokens() >= 2,
                format!(
                    "{} leaves {} position(s) for tokens (they start at row {}); every input \
                     needs at least 2 (its special tokens)",
                    self.max_position_embeddings,
                    self.max_tokens(),
                    self.position_offset()
                ),
            ),
        ];
        for (field, holds, msg) in checks {
            if !holds {
                return Err(config_err(field, path, msg));
            }
        }
        Ok(())
    }

    /// A validated XLM-RoBERTa config with bge-m3's non-size settings (eps 1e-5, one token type,
    /// pad id 1, dropout 0.1): for tests and benchmarks.
    pub fn new_xlmr(
        vocab: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        intermediate: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let sizes = [vocab, hidden, layers, heads, intermediate, max_positions];
        Self::from_sizes(ModelKind::XlmRoberta, sizes)
    }

    /// A validated BERT config with BERT's defaults (eps 1e-12, two token types, pad id 0,
    /// dropout 0.1): for tests and benchmarks.
    pub fn new_bert(
        vocab: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        intermediate: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let sizes = [vocab, hidden, layers, heads, intermediate, max_positions];
        Self::from_sizes(ModelKind::Bert, sizes)
    }

    fn from_sizes(kind: ModelKind, sizes: [usize; 6]) -> Result<Self> {
        let [vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, max_position_embeddings] =
            sizes;
        let xlmr = kind == ModelKind::XlmRoberta;
        let config = EncoderConfig {
            kind,
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            hidden_act: "gelu".into(),
            layer_norm_eps: if xlmr { 1e-5 } else { 1e-12 },
            max_position_embeddings,
            type_vocab_size: if xlmr { 1 } else { 2 },
            pad_token_id: u32::from(xlmr),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            initializer_range: 0.02,
            position_embedding_type: "absolute".into(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Width of one attention head (`hidden_size / num_attention_heads`; 0 if heads is 0).
    pub fn head_dim(&self) -> usize {
        self.hidden_size
            .checked_div(self.num_attention_heads)
            .unwrap_or(0)
    }

    /// Position-table row of the first real token: `pad_token_id + 1` for XLM-R (2 for bge-m3;
    /// row `pad_token_id` is the pad position), 0 for BERT.
    pub fn position_offset(&self) -> usize {
        match self.kind {
            ModelKind::XlmRoberta => self.pad_token_id as usize + 1,
            ModelKind::Bert => 0,
        }
    }

    /// Longest input in tokens, specials included: 8192 for bge-m3
    /// (`max_position_embeddings - pad_token_id - 1`), `max_position_embeddings` for BERT.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// A `config.json` that transformers loads with `AutoModel` (architectures, model_type, every
    /// field above, `torch_dtype` "float32").
    pub fn to_hf_json(&self) -> Value {
        json!({
            "architectures": [self.kind.architecture()],
            "model_type": self.kind.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": f32_json(self.layer_norm_eps),
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "pad_token_id": self.pad_token_id,
            "hidden_dropout_prob": f32_json(self.hidden_dropout_prob),
            "attention_probs_dropout_prob": f32_json(self.attention_probs_dropout_prob),
            "initializer_range": f32_json(self.initializer_range),
            "position_embedding_type": self.position_embedding_type,
            "torch_dtype": "float32",
        })
    }
}

/// How the dense embedding is pooled from the last hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pooling {
    /// The first token's hidden state (bge-m3's choice).
    Cls,
    /// The attention-masked mean over tokens.
    Mean,
}

impl FromStr for Pooling {
    type Err = Error;

    /// Parses `"cls"` or `"mean"` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("cls") {
            Ok(Pooling::Cls)
        } else if s.eq_ignore_ascii_case("mean") {
            Ok(Pooling::Mean)
        } else {
            Err(Error::invalid(format!(
                "unknown pooling {s:?} (expected \"cls\" or \"mean\")"
            )))
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        })
    }
}

/// What a sentence-transformers model directory says about encoding (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentenceTransformersInfo {
    /// `max_seq_length` of sentence_bert_config.json (specials included).
    pub max_seq_length: Option<usize>,
    /// The pooling of the Pooling module's config.json.
    pub pooling: Option<Pooling>,
    /// `Some(true)` when modules.json lists a Normalize module, `Some(false)` when modules.json
    /// exists without one, `None` without modules.json.
    pub normalize: Option<bool>,
}

/// Reads a JSON file if it exists: `Ok(None)` when absent, [`Error::Format`] naming the file when
/// it is not valid JSON.
fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// Pooling from a sentence-transformers Pooling config.json (`pooling_mode_*` flags, or the newer
/// `pooling_mode` string). Modes other than CLS and mean are an error naming the file.
fn read_pooling_config(path: &Path) -> Result<Option<Pooling>> {
    let Some(value) = read_optional_json(path)? else {
        return Ok(None);
    };
    let obj = value
        .as_object()
        .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
    if let Some(mode) = obj.get("pooling_mode").and_then(Value::as_str) {
        return mode.parse().map(Some).map_err(|_| {
            Error::format(
                path,
                format!("unsupported pooling_mode {mode:?} (cls or mean only)"),
            )
        });
    }
    let flag = |key: &str| -> Result<bool> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Error::format(
                path,
                format!("{key}: expected true or false, got {v}"),
            )),
        }
    };
    let mut modes = Vec::new();
    for (key, name) in [
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ("pooling_mode_lasttoken", "lasttoken"),
    ] {
        if flag(key)? {
            modes.push(name);
        }
    }
    match modes.as_slice() {
        ["cls"] => Ok(Some(Pooling::Cls)),
        ["mean"] => Ok(Some(Pooling::Mean)),
        [] => Err(Error::format(path, "no pooling mode is enabled")),
        other => Err(Error::format(
            path,
            format!(
                "unsupported pooling {} (exactly one of cls or mean is supported)",
                other.join(" + ")
            ),
        )),
    }
}

/// `do_lower_case` of a directory's sentence_bert_config.json (false when the file or the key is
/// absent or null; anything but true / false is an error naming the file).
pub fn read_do_lower_case(dir: &Path) -> Result<bool> {
    let path = dir.join("sentence_bert_config.json");
    let Some(v) = read_optional_json(&path)? else {
        return Ok(false);
    };
    match v.get("do_lower_case") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(Error::format(
            &path,
            format!("do_lower_case: expected true or false, got {other}"),
        )),
    }
}

/// Reads the optional sentence-transformers files of a model directory: `sentence_bert_config.json`
/// (`max_seq_length`), `modules.json` (the Pooling module's `config.json`, and whether a Normalize
/// module follows). Without modules.json, `1_Pooling/config.json` is still consulted. Absent files
/// give `None` fields; malformed ones an error naming the file.
pub fn read_sentence_transformers_info(dir: &Path) -> Result<SentenceTransformersInfo> {
    let mut info = SentenceTransformersInfo::default();

    let sbert_path = dir.join("sentence_bert_config.json");
    if let Some(v) = read_optional_json(&sbert_path)? {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(&sbert_path, "expected a JSON object"))?;
        if let Some(n) = obj.get("max_seq_length").filter(|v| !v.is_null()) {
            let len = n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n >= 2)
                .ok_or_else(|| {
                    let msg = format!(
                        "max_seq_length: expected an integer >= 2 (it counts the 2 special \
                         tokens), got {n}"
                    );
                    Error::format(&sbert_path, msg)
                })?;
            info.max_seq_length = Some(len);
        }
    }

    let modules_path = dir.join("modules.json");
    let Some(modules) = read_optional_json(&modules_path)? else {
        info.pooling = read_pooling_config(&dir.join("1_Pooling").join("config.json"))?;
        return Ok(info);
    };
    let list = modules
        .as_array()
        .ok_or_else(|| Error::format(&modules_path, "expected a JSON array of modules"))?;
    let mut normalize = false;
    for (i, module) in list.iter().enumerate() {
        let field = |key: &str| {
            let v = module.get(key).and_then(Value::as_str);
            let msg = format!("module {i}: missing string field {key:?}");
            v.ok_or_else(|| Error::format(&modules_path, msg))
        };
        // The class is the last dotted segment: "sentence_transformers.models.Pooling".
        match field("type")?.rsplit('.').next() {
            Some("Normalize") => normalize = true,
            Some("Pooling") => {
                let sub = field("path")?;
                let rel = Path::new(sub);
                if !rel
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
                {
                    let msg =
                        format!("module {i}: path {sub:?} must stay inside the model directory");
                    return Err(Error::format(&modules_path, msg));
                }
                let pooling_path = dir.join(rel).join("config.json");
                let pooling = read_pooling_config(&pooling_path)?.ok_or_else(|| {
                    let msg = format!("module {i}: {} is missing", pooling_path.display());
                    Error::format(&modules_path, msg)
                })?;
                info.pooling = Some(pooling);
            }
            // The backbone itself (this engine's encoder).
            Some("Transformer") => {}
            // Dense, LayerNorm, WordEmbeddings, a custom class...: sentence-transformers would
            // run it, and dropping it would give other vectors without a word.
            _ => {
                let msg = format!(
                    "module {i}: type {:?} is not supported (retrom3 runs Transformer, Pooling \
                     and Normalize modules; its vectors would differ from sentence-transformers')",
                    field("type")?
                );
                return Err(Error::format(&modules_path, msg));
            }
        }
    }
    info.normalize = Some(normalize);
    Ok(info)
}
