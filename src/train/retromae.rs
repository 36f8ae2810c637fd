//! The RetroMAE pre-training loop: data plan, masking, forward/backward with gradient
//! accumulation, AdamW with warm-up/decay and clipping, metrics, atomic checkpoints and a
//! bit-identical resume. Every random draw derives from (seed, micro-batch index), so the state to
//! resume is just the parameters, the optimizer moments and the step.

use super::checkpoint::{atomic_dir, TrainState};
use super::metrics::MetricsLog;
use super::optim::{adamw_hyper, AdamW};
use super::schedule::{linear_warmup_decay, warmup_steps};
use super::start_or_resume;
use super::GradAccumulator;
use crate::autograd::Tape;
use crate::data::masking::{make_batch, MaskingConfig, MaskingVocab, RetroMaeBatch};
use crate::data::rng::Rng;
use crate::device::cpu::elementwise::hash_u32;
use crate::device::launch::KernelDevice;
use crate::device::Device;
use crate::engine::optim::{step_groups, DeviceAdamW};
use crate::engine::retromae::{retromae_step, DeviceRetroMaeHeads};
use crate::engine::{DeviceEncoder, Gpu};
use crate::error::{Error, Result};
use crate::model::encoder::DropoutCfg;
use crate::model::params::ParamSet;
use crate::model::retromae::RetroMae;
use crate::tensor::Tensor;
use std::path::Path;
use std::time::Instant;

/// Documents of content token ids (no specials).
pub trait DocSource {
    /// Number of documents.
    fn len(&self) -> usize;
    /// True when there is no document.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Document `i`.
    fn doc(&self, i: usize) -> &[u32];
}

impl DocSource for Vec<Vec<u32>> {
    fn len(&self) -> usize {
        <[Vec<u32>]>::len(self)
    }
    fn doc(&self, i: usize) -> &[u32] {
        &self[i]
    }
}

/// Settings of a pre-training run. The default is `retrom3 pretrain`'s with no flags (one
/// epoch; override what differs: `PretrainConfig { steps: Some(100), ..Default::default() }`).
#[derive(Clone, Debug, PartialEq)]
pub struct PretrainConfig {
    /// Optimizer steps (takes precedence over `epochs`).
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    pub batch_size: usize,
    pub max_len: usize,
    pub lr: f32,
    pub warmup_ratio: f64,
    pub weight_decay: f32,
    pub grad_accum: usize,
    pub masking: MaskingConfig,
    pub seed: u64,
    /// Write `output/checkpoint-<step>` every N steps.
    pub save_every: Option<u64>,
    pub max_grad_norm: Option<f32>,
    /// Use the config's dropout (true for real training; tests may switch it off).
    pub dropout: bool,
}

impl PretrainConfig {
    /// The settings a run cannot start with, named by field: mask ratios outside (0, 1),
    /// `max_len` under 3 or over the model's `max_tokens` (the trainer checks the schedule and
    /// batch sizes itself).
    pub fn check(&self, max_tokens: usize) -> Result<()> {
        let m = &self.masking;
        for (k, p) in [("masking.p_enc", m.p_enc), ("masking.p_dec", m.p_dec)] {
            if !(p > 0.0 && p < 1.0) {
                return Err(Error::invalid(format!("{k} {p}: must be in (0, 1)")));
            }
        }
        if !(3..=max_tokens).contains(&self.max_len) {
            return Err(Error::invalid(format!(
                "max_len {}: must be in 3..={max_tokens} (specials included; the model's maximum)",
                self.max_len
            )));
        }
        Ok(())
    }
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            steps: None,
            epochs: None,
            batch_size: 8,
            max_len: 512,
            lr: 1e-4,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            grad_accum: 1,
            masking: MaskingConfig::default(),
            seed: 42,
            save_every: None,
            max_grad_norm: Some(1.0),
            dropout: true,
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct PretrainReport {
    pub steps: u64,
    /// (step, enc loss, dec loss) per step of this invocation.
    pub losses: Vec<(u64, f32, f32)>,
}

/// A run's files, each written atomically: the encoder as a model directory (model.safetensors,
/// config.json, tokenizer files), the LM head + decoder (retromae_heads.safetensors), the optimizer
/// moments and the trainer state — everything `--resume` needs.
fn write_run_files(
    dir: &Path,
    model: &RetroMae,
    opt: &AdamW,
    state: &TrainState,
    tokenizer_dir: &Path,
) -> Result<()> {
    super::ensure_params_finite(&model.params, state.step)?;
    let enc = model.encoder()?;
    let mut tensors = enc.params.to_map();
    tensors.extend(model.extra_tensors.clone());
    crate::io::write_backbone(dir, &tensors)?;
    let cfg = serde_json::to_string_pretty(&model.config.to_hf_json())
        .map_err(|e| Error::invalid(e.to_string()))?;
    crate::io::write_atomic(&dir.join("config.json"), |w| {
        std::io::Write::write_all(w, cfg.as_bytes())
    })?;
    crate::io::write_safetensors(
        &dir.join(crate::model::retromae::HEADS_FILE),
        &model.head_tensors(),
        None,
    )?;
    crate::io::write_safetensors(
        &dir.join("optimizer.safetensors"),
        &opt.state_tensors(model.params.specs())?,
        None,
    )?;
    crate::io::copy_tokenizer_files(tokenizer_dir, dir)?;
    state.save(dir)
}

/// The settings a resume must share with the run it continues (recorded in the checkpoint's
/// trainer state): hyper-parameters, masking, and a fingerprint of the corpus (document and
/// token counts, a hash of the first and last documents). `--steps` / `--epochs` /
/// `--save-every` may change.
fn run_args(cfg: &PretrainConfig, docs: &dyn DocSource) -> serde_json::Value {
    let n = docs.len();
    let tokens: u64 = (0..n).map(|i| docs.doc(i).len() as u64).sum();
    let mut h = crate::data::corpus::Fnv64::new();
    for i in [0, n.saturating_sub(1)] {
        for t in docs.doc(i) {
            h.bytes(&t.to_le_bytes());
        }
        h.bytes(&[0xff]);
    }
    // Every token and document boundary (a reordered or edited corpus with the same counts and
    // ends must not resume): a word-at-a-time multiply-rotate hash, ~1 ns a token. Its own key,
    // so a checkpoint written before it resumes as it did.
    let mut all = 0u64;
    for i in 0..n {
        let d = docs.doc(i);
        all =
            (all.rotate_left(23) ^ (d.len() as u64 | 1 << 63)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for &t in d.iter() {
            all = (all.rotate_left(23) ^ u64::from(t)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    serde_json::json!({
        "corpus_tokens_hash": format!("{all:016x}"),
        "batch_size": cfg.batch_size,
        "max_len": cfg.max_len,
        // Floats as their shortest decimal form (a JSON round trip could move them by an ulp).
        "lr": cfg.lr.to_string(),
        "warmup_ratio": cfg.warmup_ratio.to_string(),
        "weight_decay": cfg.weight_decay.to_string(),
        "grad_accum": cfg.grad_accum,
        "enc_mask": cfg.masking.p_enc.to_string(),
        "dec_mask": cfg.masking.p_dec.to_string(),
        "reference_compat": cfg.masking.reference_compat,
        "max_grad_norm": cfg.max_grad_norm.map(|c| c.to_string()),
        "dropout": cfg.dropout,
        "corpus": {
            "documents": n,
            "tokens": tokens,
            "hash": format!("{:016x}", h.finish()),
        },
    })
}

/// Run (or continue) pre-training. `resume` is the state of the checkpoint the model and optimizer
/// were restored from. Writes metrics.jsonl + metrics.svg, `checkpoint-<step>/` directories
/// (atomically) and, at the end, the final model files into `out` itself (a model directory that
/// `retrom3 encode` and transformers load).
pub fn pretrain(
    model: &mut RetroMae,
    docs: &dyn DocSource,
    vocab: &MaskingVocab,
    cfg: &PretrainConfig,
    tokenizer_dir: &Path,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
    progress: &mut dyn FnMut(u64, u64, f32, f32, f64),
) -> Result<PretrainReport> {
    pretrain_on(
        Device::Cpu,
        model,
        docs,
        vocab,
        cfg,
        tokenizer_dir,
        out,
        resume,
        progress,
    )
}

/// [`pretrain`] on `device`: on CUDA (bf16 storage, f32 accumulation) or the emulator (f32) the
/// whole step runs there (`engine::retromae::retromae_step`: encoder, MLM head, both decoder
/// streams, the two-stream decoder layer, the tied LM head and their backward, with the CPU
/// model's dropout masks) and so does AdamW ([`DeviceAdamW`], f32 master weights and moments on
/// the device, one group for the encoder and one for the LM head + decoder); per step the host
/// reads back the two losses and one Σ g² per run of tensors. With `reference_compat` (a
/// materialised [B, L, L] decoder mask, which the device kernels do not take) only the encoder
/// runs there: the decoder and the LM head stay on the host tape and the five embedding tensors
/// they share keep the host optimizer (device gradients read back and summed with the host's,
/// new values written up after each step). Under emulation a step equals the CPU step up to float
/// summation order.
#[allow(clippy::too_many_arguments)]
pub fn pretrain_on(
    device: Device,
    model: &mut RetroMae,
    docs: &dyn DocSource,
    vocab: &MaskingVocab,
    cfg: &PretrainConfig,
    tokenizer_dir: &Path,
    out: &Path,
    resume: Option<(TrainState, AdamW)>,
    progress: &mut dyn FnMut(u64, u64, f32, f32, f64),
) -> Result<PretrainReport> {
    device.ensure_available()?;
    let engine = crate::engine::trainer_encoder(device, &model.encoder()?)?;
    let n_enc = crate::model::encoder::encoder_param_specs(&model.config).len();
    let n_emb = crate::model::encoder::EMBEDDING_TENSORS;
    if docs.is_empty() {
        return Err(Error::invalid("the corpus has no document"));
    }
    super::check_schedule(
        cfg.lr,
        cfg.warmup_ratio,
        cfg.weight_decay,
        cfg.max_grad_norm,
        cfg.steps,
        cfg.epochs,
    )?;
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return Err(Error::invalid(
            "batch size and grad accumulation must be >= 1",
        ));
    }
    cfg.check(model.config.max_tokens())?;
    // The decoder's in-kernel mask takes the model's rate, the reference-compat collator and the
    // checkpoint's fingerprint the config's: one value, or a run would train on one and record
    // the other.
    if model.p_dec != cfg.masking.p_dec as f32 {
        return Err(Error::invalid(format!(
            "decoder mask rate: the model's p_dec {} differs from masking.p_dec {} (set both \
             from one value, as `retrom3 pretrain --dec-mask` does)",
            model.p_dec, cfg.masking.p_dec
        )));
    }
    // The masking vocabulary is the tokenizer's: no bigger than the model's embedding table, its
    // special ids inside it (another model's tokenizer would train on ids the model misreads).
    let v = model.config.vocab_size;
    if vocab.vocab_size == 0 || vocab.vocab_size > v {
        return Err(Error::Config {
            field: "vocab_size".into(),
            msg: format!(
                "the tokenizer has {} tokens but the model's embedding table {v}: another \
                 model's tokenizer?",
                vocab.vocab_size
            ),
        });
    }
    if let Some((name, id)) = [
        ("cls", vocab.cls),
        ("eos", vocab.eos),
        ("pad", vocab.pad),
        ("mask", vocab.mask),
    ]
    .into_iter()
    .find(|&(_, id)| id as usize >= vocab.vocab_size)
    {
        return Err(Error::invalid(format!(
            "masking vocabulary: the {name} id {id} is outside its {} ids",
            vocab.vocab_size
        )));
    }
    // Its padding id is the one the model's position ids count from: a BERT tokenizer on an
    // XLM-R model (smaller vocabulary, pad 0 against 1) would train on ids the model misreads.
    if vocab.pad != model.config.pad_token_id {
        return Err(Error::Config {
            field: "pad_token_id".into(),
            msg: format!(
                "the tokenizer {} pads with id {}, the model's config.json with {}: another \
                 model's tokenizer",
                tokenizer_dir.display(),
                vocab.pad,
                model.config.pad_token_id
            ),
        });
    }
    let per_epoch = (docs.len() / cfg.batch_size) as u64;
    if per_epoch == 0 {
        return Err(Error::invalid(format!(
            "{} documents are fewer than one batch of {}",
            docs.len(),
            cfg.batch_size
        )));
    }
    let total = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, e) => {
            let e = e.unwrap_or(1);
            let micro = e.checked_mul(per_epoch).ok_or_else(|| {
                Error::invalid(format!(
                    "{e} epochs of {per_epoch} micro-batches overflow the step count"
                ))
            })?;
            // One step takes grad_accum micro-batches: fewer than that in the epochs asked for
            // would train on more data than asked (or never end, for a huge accumulation).
            if micro < cfg.grad_accum as u64 {
                return Err(Error::invalid(format!(
                    "grad accumulation {}: more micro-batches per step than the {micro} of {e} \
                     epoch(s) ({} documents in batches of {})",
                    cfg.grad_accum,
                    docs.len(),
                    cfg.batch_size
                )));
            }
            micro / cfg.grad_accum as u64
        }
    };
    let warmup = warmup_steps(total, cfg.warmup_ratio);
    let (mut state, mut opt) = start_or_resume(
        resume,
        model.params.specs(),
        adamw_hyper(cfg.lr, cfg.weight_decay),
        cfg.max_grad_norm,
        cfg.seed,
        total,
    );
    super::check_resume_step(&state, total)?;
    // Every optimizer step consumed grad_accum micro-batches: a trainer state that says
    // otherwise was edited or mixed with another run's, and its data cursor cannot be trusted.
    if state.batches_seen != state.step.saturating_mul(cfg.grad_accum as u64) {
        return Err(Error::invalid(format!(
            "resumed trainer state: {} micro-batches seen in {} steps of {} (expected {})",
            state.batches_seen,
            state.step,
            cfg.grad_accum,
            state.step.saturating_mul(cfg.grad_accum as u64)
        )));
    }
    let args = run_args(cfg, docs);
    super::check_resume_args(&state.args, &args)?;
    state.args = args;
    // The device's state: with the in-kernel decoder mask the whole step runs there (encoder,
    // LM head and decoder, each group with its device optimizer); a materialised mask
    // (`reference_compat`) keeps the decoder and LM head on the host.
    let dstate = match &engine {
        Some((dev, denc)) if !cfg.masking.reference_compat => {
            let n_all = model.params.values().len();
            let heads =
                DeviceRetroMaeHeads::upload(&**dev, &model.params.values()[n_enc..], denc.dt)?;
            let enc_opt = DeviceAdamW::new(&**dev, denc, &model.params, &opt, &vec![false; n_enc])?;
            let heads_opt = DeviceAdamW::new_group(
                &**dev,
                heads.flat().1,
                n_enc,
                &model.params,
                &opt,
                &vec![false; n_all - n_enc],
            )?;
            Some(DevState::Whole(Box::new(WholeStep {
                enc_opt,
                heads,
                heads_opt,
            })))
        }
        Some((dev, denc)) => {
            // Device gradient buffers (views of one flat buffer, cleared every step) and the
            // device optimizer of the encoder's layers; the embedding tensors are "frozen" for
            // it (host-owned).
            let host_owned: Vec<bool> = (0..model.params.values().len())
                .map(|i| i < n_emb || i >= n_enc)
                .collect();
            Some(DevState::Encoder(Box::new(DeviceAdamW::new(
                &**dev,
                denc,
                &model.params,
                &opt,
                &host_owned,
            )?)))
        }
        None => None,
    };
    super::create_output_dir(out)?;
    super::checkpoint::retire_later_state(out, state.step)?;
    super::checkpoint::clear_dead_saves(out)?;
    let mut metrics = MetricsLog::open_resumed(
        &out.join("metrics.jsonl"),
        state.step,
        state.metrics_checksum.as_deref(),
        state.log.as_deref(),
    )?;
    let mut order: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let mut report = PretrainReport {
        steps: total,
        losses: Vec::new(),
    };
    let c = model.config.clone();
    while state.step < total {
        let t0 = Instant::now();
        let mut grads = GradAccumulator::new(model.params.values().len());
        if let (Some((dev, _)), Some(ds)) = (&engine, &dstate) {
            ds.clear_grads(&**dev)?;
        }
        let (mut le, mut ld, mut tokens) = (0.0f64, 0.0f64, 0usize);
        for _ in 0..cfg.grad_accum {
            let k = state.batches_seen;
            let epoch = k / per_epoch;
            if order.0 != epoch {
                let mut o: Vec<usize> = (0..docs.len()).collect();
                Rng::new(cfg.seed, 0x100 + epoch).shuffle(&mut o);
                order = (epoch, o);
            }
            let start = ((k % per_epoch) as usize) * cfg.batch_size;
            let batch_docs: Vec<&[u32]> = order.1[start..start + cfg.batch_size]
                .iter()
                .map(|&i| docs.doc(i))
                .collect();
            let mut rng = Rng::new(cfg.seed, (1 << 40) + k);
            let batch = make_batch(&batch_docs, vocab, &cfg.masking, cfg.max_len, &mut rng)?;
            tokens += batch.dec.mask.iter().filter(|&&m| m != 0).count();
            let drop = cfg.dropout.then(|| DropoutCfg {
                hidden: c.hidden_dropout_prob,
                attention: c.attention_probs_dropout_prob,
                seed: ((hash_u32(cfg.seed, 7, k) as u64) << 32) | hash_u32(cfg.seed, 8, k) as u64,
            });
            let (enc, dec) = match (&engine, &dstate) {
                (Some((dev, denc)), Some(DevState::Whole(w))) => retromae_step(
                    &**dev,
                    denc,
                    &w.heads,
                    (w.enc_opt.grads(), w.heads_opt.grads()),
                    &batch,
                    model.p_dec,
                    drop,
                    1.0 / cfg.grad_accum as f32,
                )
                .map_err(|e| at_step(e, state.step + 1))?,
                _ => host_decoder_step(
                    model,
                    &engine,
                    &dstate,
                    &mut grads,
                    &batch,
                    drop,
                    cfg.grad_accum,
                    state.step + 1,
                )?,
            };
            if !(enc.is_finite() && dec.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "RetroMAE loss at step {} (enc {enc}, dec {dec})",
                    state.step + 1,
                )));
            }
            le += enc as f64 / cfg.grad_accum as f64;
            ld += dec as f64 / cfg.grad_accum as f64;
            state.batches_seen += 1;
        }
        if let (Some((dev, _)), Some(DevState::Encoder(dopt))) = (&engine, &dstate) {
            // The host-owned embedding tensors: device gradient + the decoder's / LM head's.
            for (i, b) in dopt.grads().iter().enumerate().take(n_emb) {
                grads.add_values(i, &b.to_f32(&**dev)?);
            }
        }
        let grads = grads.into_tensors(model.params.specs(), |_| false)?;
        let lr = cfg.lr * linear_warmup_decay(state.step, total, warmup);
        let norm = match (&engine, &dstate) {
            (Some((dev, denc)), Some(DevState::Whole(w))) => {
                let enc_flat = denc
                    .flat_weights()
                    .ok_or_else(|| Error::invalid("device optimizer: the encoder has no weights"))?
                    .0;
                step_groups(
                    &**dev,
                    &[(&w.enc_opt, enc_flat), (&w.heads_opt, w.heads.flat().0)],
                    &mut model.params,
                    &mut opt,
                    &grads,
                    lr,
                    1.0,
                )?
            }
            (Some((dev, denc)), Some(DevState::Encoder(dopt))) => {
                let norm = dopt.step_with_host(
                    &**dev,
                    denc,
                    &mut model.params,
                    &mut opt,
                    &grads,
                    lr,
                    1.0,
                )?;
                // The host-owned embedding tensors go back up (views of the same weights).
                for (i, w) in denc.weights().iter().enumerate().take(n_emb) {
                    w.write_f32(&**dev, model.params.values()[i].f32s()?)?;
                }
                norm
            }
            _ => opt.update(&mut model.params, &grads, lr)?,
        };
        state.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        let tps = tokens as f64 / secs.max(1e-9);
        metrics.log(serde_json::json!({
            "step": state.step,
            "lr": lr,
            "enc_loss": le,
            "dec_loss": ld,
            "loss": le + ld,
            "grad_norm": norm,
            "tokens": tokens,
            "tokens_per_s": tps,
        }))?;
        report.losses.push((state.step, le as f32, ld as f32));
        progress(state.step, total, le as f32, ld as f32, tps);
        if cfg
            .save_every
            .is_some_and(|n| n > 0 && state.step % n == 0 && state.step < total)
        {
            if let (Some((dev, _)), Some(ds)) = (&engine, &dstate) {
                ds.sync_to_host(&**dev, &mut model.params, &mut opt)?;
            }
            state.metrics_checksum = Some(metrics.checksum());
            let dir = out.join(format!("checkpoint-{}", state.step));
            atomic_dir(&dir, |tmp| {
                write_run_files(tmp, model, &opt, &state, tokenizer_dir)?;
                super::checkpoint::write_log_copy(tmp, metrics.text())
            })?;
            metrics.write_svg(
                &out.join("metrics.svg"),
                "RetroMAE pre-training",
                &["enc_loss", "dec_loss"],
            )?;
        }
    }
    if let (Some((dev, _)), Some(ds)) = (&engine, &dstate) {
        ds.sync_to_host(&**dev, &mut model.params, &mut opt)?;
    }
    // The final files replace the resumed run's (if `out` is its directory) all together; an
    // M3 run's heads there would be paired with this encoder by every loader: removed.
    let stale = [
        crate::io::model_dir::COLBERT_FILE,
        crate::io::model_dir::SPARSE_FILE,
    ];
    state.metrics_checksum = Some(metrics.checksum());
    super::replace_files(out, &stale, |tmp| {
        write_run_files(tmp, model, &opt, &state, tokenizer_dir)
    })?;
    metrics.write_svg(
        &out.join("metrics.svg"),
        "RetroMAE pre-training",
        &["enc_loss", "dec_loss"],
    )?;
    Ok(report)
}

/// The device state of a run whose whole step is there: the encoder's optimizer, the LM head +
/// decoder and theirs.
struct WholeStep {
    enc_opt: DeviceAdamW,
    heads: DeviceRetroMaeHeads,
    heads_opt: DeviceAdamW,
}

/// What a device run keeps on the device.
enum DevState {
    /// The whole step on the device.
    Whole(Box<WholeStep>),
    /// The encoder's layers only (decoder on the host, `reference_compat`).
    Encoder(Box<DeviceAdamW>),
}

impl DevState {
    fn clear_grads(&self, dev: &dyn KernelDevice) -> Result<()> {
        match self {
            DevState::Whole(w) => {
                w.enc_opt.clear_grads(dev)?;
                w.heads_opt.clear_grads(dev)
            }
            DevState::Encoder(o) => o.clear_grads(dev),
        }
    }

    fn sync_to_host(
        &self,
        dev: &dyn KernelDevice,
        params: &mut ParamSet,
        opt: &mut AdamW,
    ) -> Result<()> {
        match self {
            DevState::Whole(w) => {
                w.enc_opt.sync_to_host(dev, params, opt)?;
                w.heads_opt.sync_to_host(dev, params, opt)
            }
            DevState::Encoder(o) => o.sync_to_host(dev, params, opt),
        }
    }
}

/// A step error with the optimizer step it happened at.
fn at_step(e: Error, step: u64) -> Error {
    match e {
        Error::NonFinite(m) => Error::NonFinite(format!("{m} (RetroMAE step {step})")),
        e => e,
    }
}

/// One micro-batch with the decoder and LM head on the host tape (the CPU run, and a device run
/// with a materialised decoder mask whose encoder runs on the device): adds the host gradients
/// to `grads` and the device's to the encoder optimizer's buffers; returns (L_enc, L_dec).
#[allow(clippy::too_many_arguments)]
fn host_decoder_step(
    model: &RetroMae,
    engine: &Option<(std::sync::Arc<Gpu>, DeviceEncoder)>,
    dstate: &Option<DevState>,
    grads: &mut GradAccumulator,
    batch: &RetroMaeBatch,
    drop: Option<DropoutCfg>,
    grad_accum: usize,
    step: u64,
) -> Result<(f32, f32)> {
    let mut tape = Tape::new();
    let p = model.params.bind(&mut tape);
    // With a device, the encoder's hidden state comes from it as a leaf of the tape.
    let dev_fwd = match engine {
        Some((dev, denc)) => Some(denc.forward_leaf(&**dev, &mut tape, &batch.enc, drop)?),
        None => None,
    };
    let hidden = dev_fwd.as_ref().map(|(_, leaf)| leaf.clone());
    let loss = model
        .loss_with_hidden(&mut tape, &p, batch, drop, hidden)
        .map_err(|e| at_step(e, step))?;
    if !(loss.enc.is_finite() && loss.dec.is_finite()) {
        return Ok((loss.enc, loss.dec));
    }
    let mut g = tape.backward_with(
        &loss.total,
        Tensor::from_vec(vec![1.0 / grad_accum as f32], &[1])?,
    )?;
    grads.add(&g, &p)?;
    if let (Some((dev, denc)), Some((f, leaf)), Some(DevState::Encoder(dopt))) =
        (engine, dev_fwd, dstate)
    {
        // Accumulates over the micro-batches.
        denc.backward_leaf(&**dev, f, &leaf, &mut g, dopt.grads())?;
    }
    Ok((loss.enc, loss.dec))
}

impl DocSource for crate::data::corpus::TokenCorpus {
    fn len(&self) -> usize {
        crate::data::corpus::TokenCorpus::len(self)
    }
    fn doc(&self, i: usize) -> &[u32] {
        crate::data::corpus::TokenCorpus::doc(self, i)
    }
}
