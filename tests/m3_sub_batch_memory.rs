//! Peak memory of one M3 training step, full-batch tape vs the exact two-pass sub-batching
//! (`M3Student::sub_batch_grads`), measured with a counting global allocator: the peak of live
//! heap bytes above the level before the step (model and batch already allocated). This binary
//! holds a single test so nothing else allocates meanwhile.

use retrom3::autograd::Tape;
use retrom3::model::encoder::{DropoutCfg, Encoder, EncoderInput};
use retrom3::model::m3_train::{fresh_heads, KdLoss, M3Batch, M3LossConfig, M3Student};
use retrom3::EncoderConfig;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), SeqCst) + l.size();
            PEAK.fetch_max(now, SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), SeqCst);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak live bytes above the starting level while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    let r = f();
    (r, PEAK.load(SeqCst) - base)
}

#[test]
fn sub_batching_lowers_peak_memory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr");
    let cfg = EncoderConfig::from_file(dir.join("config.json")).unwrap();
    let (map, path) = retrom3::io::read_backbone(&dir).unwrap();
    let enc = Encoder::from_tensors(cfg, &map, &path).unwrap();
    let m = M3Student::new(enc, &fresh_heads(32, 1).unwrap()).unwrap();
    // B = 4 queries of 16 tokens, G = 8: 32 passages of 40 tokens (the model's maximum).
    let text = |i: usize, len: usize| -> Vec<u32> {
        let mut t = vec![0u32];
        t.extend((1..len - 1).map(|j| 5 + ((i * 31 + j * 7) % 900) as u32));
        t.push(2);
        t
    };
    let q: Vec<Vec<u32>> = (0..4).map(|i| text(i, 16)).collect();
    let p: Vec<Vec<u32>> = (0..32).map(|i| text(100 + i, 40 - i % 5)).collect();
    let batch = M3Batch {
        queries: EncoderInput::pad(&q, 1),
        passages: EncoderInput::pad(&p, 1),
        group: 8,
        teacher: None,
        no_in_batch: false,
        cross_device: None,
    };
    let lc = M3LossConfig {
        temperature: 0.02,
        unified: true,
        self_distill: true,
        kd: KdLoss::M3KdLoss,
    };
    let drop = Some(DropoutCfg {
        hidden: 0.1,
        attention: 0.1,
        seed: 9,
    });
    let ids = [0, 1, 2, 3];
    let (full, full_peak) = peak_of(|| {
        let mut tape = Tape::new();
        let pv = m.params.bind(&mut tape);
        let loss = m.loss(&mut tape, &pv, &batch, &lc, drop, &ids).unwrap();
        let v = loss.values().unwrap().total;
        let g = tape.backward(&loss.total).unwrap();
        let n: usize = pv.iter().filter_map(|x| g.get(x)).map(|t| t.numel()).sum();
        (v, n)
    });
    let param_bytes: usize = m.params.values().iter().map(|t| t.numel() * 4).sum();
    eprintln!(
        "params {param_bytes} B; full-batch tape: peak +{full_peak} B ({:.1}x params)",
        full_peak as f64 / param_bytes as f64
    );
    let mut peaks = Vec::new();
    for sub in [1, 2, 8, 36] {
        let ((vals, grads), peak) =
            peak_of(|| m.sub_batch_grads(&batch, &lc, drop, &ids, sub).unwrap());
        assert!((vals.total - full.0).abs() <= 1e-5 * full.0.abs());
        assert_eq!(
            grads.iter().flatten().map(|t| t.numel()).sum::<usize>(),
            full.1
        );
        eprintln!(
            "sub-batch {sub:2}: peak +{peak} B ({:.1}% of the full-batch peak)",
            100.0 * peak as f64 / full_peak as f64
        );
        peaks.push(peak);
    }
    // One or two texts at a time hold far less than the whole batch's activations.
    assert!(peaks[0] * 3 < full_peak, "{peaks:?} vs {full_peak}");
    assert!(peaks[1] * 3 < full_peak, "{peaks:?} vs {full_peak}");
    assert!(peaks[0] <= peaks[1] && peaks[1] <= peaks[2]);
}
