//! Build script. Without the `cuda` feature it does nothing. With it, every `kernels/*.cu` is
//! compiled by nvcc into a fatbin (SASS for each architecture in CUDA_COMPUTE_CAP, default 80,90,
//! plus compute_90 PTX), with `-Xptxas=-v,-warn-spills,-Werror` so a register spill fails the
//! build. The fatbins are embedded via a generated `kernels.rs`; the ptxas resource report is
//! written to `$OUT_DIR/ptxas-report.txt` and summarised as cargo warnings. nvidia-smi is never
//! called: the target architectures come from the environment only.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| {
        fail(
            "the `cuda` feature needs nvcc, and none was found (looked at $NVCC, $CUDA_HOME/bin, \
             $CUDA_PATH/bin, ./.cuda/nvidia/cu13/bin and PATH). Install the pinned toolkit with \
             `bash tools/install-nvcc.sh` (pip wheels into ./.cuda, no GPU needed) or set NVCC.",
        )
    });
    let caps = compute_caps();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(manifest.join("kernels"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let mut report = String::new();
    let mut registry = String::from("/// Embedded fatbins, one per kernels/*.cu: (file stem, bytes).\npub const KERNEL_MODULES: &[(&str, &[u8])] = &[\n");
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 kernel file name");
        let out = out_dir.join(format!("{stem}.fatbin"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("-fatbin")
            .args(["-O3", "-std=c++17", "--threads", "0", "-lineinfo"])
            .arg("-Xptxas=-v,-warn-spills,-Werror")
            .arg(format!("-I{}", manifest.join("kernels").display()));
        for cap in &caps {
            cmd.arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"));
        }
        let ptx = caps.iter().max().copied().unwrap_or(90);
        cmd.arg(format!("-gencode=arch=compute_{ptx},code=compute_{ptx}"));
        cmd.arg("-o").arg(&out).arg(src);
        let output = cmd
            .output()
            .unwrap_or_else(|e| fail(&format!("could not run {}: {e}", nvcc.display())));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let _ = writeln!(report, "==== {}\n{stderr}", src.display());
        if !output.status.success() {
            fail(&format!(
                "nvcc failed on {} (spills are errors):\n{stderr}",
                src.display()
            ));
        }
        for line in stderr
            .lines()
            .filter(|l| l.contains("Used") || l.contains("spill"))
        {
            if line.contains("spill") && !line.contains(" 0 bytes spill") {
                println!("cargo:warning={stem}: {}", line.trim());
            }
        }
        let _ = writeln!(
            registry,
            "    (\"{stem}\", include_bytes!(\"{}\")),",
            out.display()
        );
    }
    registry.push_str("];\n");
    let _ = writeln!(registry, "/// The architectures the fatbins carry SASS for.\npub const KERNEL_ARCHS: &[u32] = &{caps:?};");
    std::fs::write(out_dir.join("kernels.rs"), registry).expect("write kernels.rs");
    let report_path = out_dir.join("ptxas-report.txt");
    std::fs::write(&report_path, &report).expect("write ptxas report");
    println!(
        "cargo:warning=compiled {} kernel files for sm_{:?}; ptxas report: {}",
        sources.len(),
        caps,
        report_path.display()
    );
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    std::process::exit(1);
}

fn compute_caps() -> Vec<u32> {
    let raw = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80,90".into());
    let caps: Vec<u32> = raw
        .split(',')
        .map(|s| s.trim().trim_start_matches("sm_"))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| fail(&format!("CUDA_COMPUTE_CAP: bad entry {s:?}")))
        })
        .collect();
    if caps.is_empty() {
        fail("CUDA_COMPUTE_CAP is empty");
    }
    caps
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let candidates = [
        env::var_os("NVCC").map(PathBuf::from),
        env::var_os("CUDA_HOME").map(|p| PathBuf::from(p).join("bin/nvcc")),
        env::var_os("CUDA_PATH").map(|p| PathBuf::from(p).join("bin/nvcc")),
        Some(manifest.join(".cuda/nvidia/cu13/bin/nvcc")),
    ];
    if let Some(p) = candidates.into_iter().flatten().find(|p| p.is_file()) {
        return Some(p);
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}
