//! Where a member computes, in what precision, and how it holds its weights:
//! `--device`, `--dtype` and `--weights`, parsed once ([`ComputeArgs`]) and turned
//! into a candle device in one place ([`ComputeArgs::select`]). Every role,
//! `tessera up`, `generate` and `bench` take these flags; nothing else names a device.
//!
//! `cuda:N` needs a binary built with the `cuda` feature, the NVIDIA driver and the
//! CUDA libraries (cuBLAS, cuRAND, NVRTC) that candle opens at run time; each of those
//! missing is refused here, at start-up, with a message that says which.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
pub use tessera_model::weights::WeightFormat;

/// A device named on the command line: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") {
            return Ok(Self::Cpu);
        }
        let ordinal = match s.split_once(':') {
            None if s.eq_ignore_ascii_case("cuda") => Some("0"),
            Some((kind, n)) if kind.eq_ignore_ascii_case("cuda") => Some(n),
            _ => None,
        };
        match ordinal.map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Self::Cuda(n)),
            _ => Err(format!(
                "unknown device {s:?}: expected `cpu`, `cuda` or `cuda:N`"
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Precision of a member's weights and activations (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        p.dtype()
    }
}

/// `--device` (or a flag it does not go with) refused: the reason names what is
/// missing and what works instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--device {device}: {reason}")]
pub struct DeviceError {
    pub device: DeviceSpec,
    pub reason: String,
}

/// `--device`, `--dtype` and `--weights`, shared by every command that loads weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args)]
pub struct ComputeArgs {
    /// Device to run on: `cpu`, or `cuda:N` (the N-th NVIDIA GPU; needs a binary built
    /// with the `cuda` feature and the NVIDIA driver).
    #[arg(long, env = "TESSERA_DEVICE", default_value_t = DeviceSpec::Cpu)]
    pub device: DeviceSpec,
    /// Precision of the activations, norms and biases. Default: f32 on the CPU
    /// (fastest there), bf16 on a GPU.
    #[arg(long, env = "TESSERA_DTYPE", value_enum)]
    pub dtype: Option<Precision>,
    /// How linear weights (every projection, the experts, the LM head; the token
    /// embeddings alike) are held in memory; products compute in f32 from them.
    /// `auto`: on the CPU as the checkpoint stores them (bf16 for the released models)
    /// with `--dtype f32`, else in `--dtype`; on a GPU in `--dtype`. `f32`, `bf16`,
    /// `f16`: converted at load. `int8` (CPU only): quantized at load, one f32 scale
    /// per 32 weights of a row.
    /// Memory ≈ parameters × bytes per weight (4, 2, 2, 1.125).
    #[arg(long, env = "TESSERA_WEIGHTS", default_value_t = WeightFormat::Auto,
          value_parser = parse_weights)]
    pub weights: WeightFormat,
}

fn parse_weights(s: &str) -> Result<WeightFormat, String> {
    s.parse()
}

/// The device and dtype a member loads its weights onto, and how it holds them.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
    pub weights: WeightFormat,
}

impl ComputeArgs {
    /// The CPU in `dtype`.
    pub fn cpu(dtype: Precision) -> Self {
        Self {
            device: DeviceSpec::Cpu,
            dtype: Some(dtype),
            weights: WeightFormat::Auto,
        }
    }

    /// `--dtype`, or the device's default: f32 on the CPU, bf16 on a GPU.
    pub fn precision(&self) -> Precision {
        self.dtype.unwrap_or(match self.device {
            DeviceSpec::Cpu => Precision::F32,
            DeviceSpec::Cuda(_) => Precision::Bf16,
        })
    }

    /// The device and dtype to load onto; a device this binary or machine cannot use
    /// is refused here, before anything loads.
    pub fn select(&self) -> Result<Compute, DeviceError> {
        let refused = |reason: String| DeviceError {
            device: self.device,
            reason,
        };
        let dtype = self.precision().dtype();
        if std::env::var("TESSERA_PORTABLE_PATHS").is_ok_and(|v| v == "1") {
            // The GPU's tensor-operation path on the CPU too: for checking that path
            // (`tessera parity`) on a machine without a GPU.
            tessera_model::ops::use_portable_paths(true);
        }
        let (device, weights) = match self.device {
            DeviceSpec::Cpu => (Device::Cpu, self.weights),
            DeviceSpec::Cuda(ordinal) => {
                // On a GPU the products run in the compute dtype (cuBLAS): weights are
                // held in it unless `--weights` names another dense format.
                let weights = match self.weights {
                    WeightFormat::Int8 => {
                        return Err(refused(
                            "--weights int8 runs on the CPU only; on a GPU use --weights \
                             auto, bf16, f16 or f32"
                                .into(),
                        ));
                    }
                    WeightFormat::Auto => match self.precision() {
                        Precision::F32 => WeightFormat::F32,
                        Precision::F16 => WeightFormat::F16,
                        Precision::Bf16 => WeightFormat::Bf16,
                    },
                    other => other,
                };
                (cuda::open(ordinal).map_err(refused)?, weights)
            }
        };
        Ok(Compute {
            device,
            dtype,
            weights,
        })
    }
}

/// Free and total bytes of memory of the GPU `device`; `None` on the CPU.
pub fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    cuda::memory(device)
}

/// Opening an NVIDIA GPU through candle's CUDA backend.
#[cfg(not(feature = "cuda"))]
mod cuda {
    pub fn memory(_device: &candle_core::Device) -> Option<(u64, u64)> {
        None
    }

    pub fn open(_ordinal: usize) -> Result<candle_core::Device, String> {
        Err("this binary was built without CUDA support; build it with \
             `cargo build --release --features cuda` (README, \"GPUs\") or use --device cpu"
            .into())
    }
}

/// Opening an NVIDIA GPU through candle's CUDA backend.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::Device;

    /// The libraries candle opens at run time (cudarc's dynamic loading): the names
    /// each is found under, and what its absence means.
    const LIBRARIES: [(&[&str], &str); 5] = [
        (
            &["libcuda.so.1", "libcuda.so"],
            "the NVIDIA driver is not installed (libcuda.so.1 could not be loaded; a \
             container needs the NVIDIA container toolkit and a GPU assigned to it)",
        ),
        (
            &["libcublas.so.13", "libcublas.so"],
            "cuBLAS (libcublas.so.13) could not be loaded",
        ),
        (
            &["libcublasLt.so.13", "libcublasLt.so"],
            "cuBLASLt (libcublasLt.so.13) could not be loaded",
        ),
        (
            &["libcurand.so.10", "libcurand.so"],
            "cuRAND (libcurand.so.10) could not be loaded",
        ),
        (
            &["libnvrtc.so.13", "libnvrtc.so"],
            "NVRTC (libnvrtc.so.13) could not be loaded",
        ),
    ];

    /// Whether the dynamic loader finds `name`.
    #[allow(unsafe_code)]
    fn loadable(name: &str) -> bool {
        // SAFETY: loading one of the CUDA libraries above runs only its own
        // initialisers, which have no preconditions; the handle is closed at once.
        unsafe { libloading::Library::new(name) }.is_ok()
    }

    /// Free and total bytes of the GPU behind `device` (`None` on the CPU).
    pub fn memory(device: &Device) -> Option<(u64, u64)> {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        let cuda = device.as_cuda_device().ok()?;
        cuda.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = mem_get_info().ok()?;
        Some((free as u64, total as u64))
    }

    /// The GPU `ordinal` with its own stream, or why it cannot be used.
    pub fn open(ordinal: usize) -> Result<Device, String> {
        // Every missing library is named, the driver first.
        let missing: Vec<&str> = LIBRARIES
            .iter()
            .filter(|(names, _)| !names.iter().any(|n| loadable(n)))
            .map(|(_, what)| *what)
            .collect();
        if !missing.is_empty() {
            let libraries = missing.iter().any(|m| !m.starts_with("the NVIDIA driver"));
            let hint = if libraries {
                "; the CUDA 13 libraries are found through LD_LIBRARY_PATH (README, \"GPUs\")"
            } else {
                ""
            };
            return Err(format!("{}{hint}; or use --device cpu", missing.join("; ")));
        }
        // cudarc panics where a symbol it needs is missing from a library found above
        // (a driver older than the toolkit): report that as a refusal too, with the
        // panic's message instead of the default hook's report.
        // Members of one process open their devices concurrently: one at a time here,
        // so each puts back the hook it found.
        static OPENING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let opened = {
            let _one = OPENING.lock().unwrap_or_else(|e| e.into_inner());
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let opened = std::panic::catch_unwind(|| Device::new_cuda_with_stream(ordinal));
            std::panic::set_hook(hook);
            opened
        };
        let device = opened
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown");
                format!(
                    "the CUDA driver could not be initialised ({why}); the driver must \
                     support CUDA 13.0 (version 580 or newer)"
                )
            })?
            .map_err(|e| {
                let e = e.to_string();
                let hint = if e.contains("NO_DEVICE") {
                    "the NVIDIA driver sees no GPU on this machine"
                } else if e.contains("INVALID_DEVICE") {
                    "there is no GPU with that number (they count from cuda:0)"
                } else if e.contains("INSUFFICIENT_DRIVER") || e.contains("COMPAT") {
                    "the NVIDIA driver is older than CUDA 13.0 (needs version 580 or newer)"
                } else {
                    "the GPU could not be opened"
                };
                format!("{hint} ({e})")
            })?;
        let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
        // SAFETY: every tensor of this member is created on and used through this
        // device, whose one stream (and cuBLAS and cuRAND handles) orders all of its
        // work; tensors reach other members only through host memory. No tensor is
        // ever used on a second stream, so the per-use events are not needed.
        #[allow(unsafe_code)]
        unsafe {
            cuda.disable_event_tracking()
        };
        Ok(device)
    }
}

impl Compute {
    /// Where `checkpoint`'s tensors load to: this device, dtype and weight format.
    pub fn target<'a>(
        &'a self,
        checkpoint: &'a tessera_model::weights::Checkpoint,
    ) -> tessera_model::weights::LoadTarget<'a> {
        tessera_model::weights::LoadTarget::new(checkpoint, self.dtype, self.weights, &self.device)
    }

    /// The host CPU in f32: for tensors that never touch a model (decoded
    /// request payloads, files written for inspection).
    pub fn host() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightFormat::Auto,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        compute: ComputeArgs,
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn the_cpu_is_chosen_by_default_in_f32() {
        let cli = Cli::parse_from(["t"]);
        assert_eq!(cli.compute, ComputeArgs::default());
        let chosen = cli.compute.select().unwrap();
        assert!(chosen.device.is_cpu());
        assert_eq!(chosen.dtype, DType::F32);
        let bf16 = Cli::parse_from(["t", "--dtype", "bf16"])
            .compute
            .select()
            .unwrap();
        assert_eq!(bf16.dtype, DType::BF16);
        assert_eq!(bf16.weights, WeightFormat::Auto);
        let int8 = Cli::parse_from(["t", "--weights", "int8"]).compute;
        assert_eq!(int8.weights, WeightFormat::Int8);
        let err = Cli::try_parse_from(["t", "--weights", "q4"])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("auto, f32, bf16, f16, int8"), "{err}");
        assert!(Cli::try_parse_from(["t", "--device", "gpu"]).is_err());
    }

    #[test]
    fn a_gpu_defaults_to_bf16_and_refuses_int8() {
        let gpu = Cli::parse_from(["t", "--device", "cuda:1"]).compute;
        assert_eq!(gpu.precision(), Precision::Bf16);
        let f32 = Cli::parse_from(["t", "--device", "cuda", "--dtype", "f32"]).compute;
        assert_eq!(f32.precision(), Precision::F32);
        let err = Cli::parse_from(["t", "--device", "cuda:0", "--weights", "int8"])
            .compute
            .select()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--device cuda:0:") && err.contains("CPU only"),
            "{err}"
        );
    }

    /// Without the `cuda` feature the refusal says the binary lacks CUDA; with it, on
    /// a machine without the driver or a GPU, it says which of those is missing.
    #[test]
    fn cuda_is_refused_clearly_where_it_cannot_run() {
        let cuda = Cli::parse_from(["t", "--device", "cuda:1"]).compute;
        let Err(err) = cuda.select() else {
            // A machine with two GPUs, the driver and a CUDA build: nothing to refuse.
            return;
        };
        let err = err.to_string();
        assert!(
            err.starts_with("--device cuda:1:") && err.contains("--device cpu")
                || err.contains("GPU")
                || err.contains("driver"),
            "{err}"
        );
        if cfg!(not(feature = "cuda")) {
            assert!(err.contains("built without CUDA support"), "{err}");
        }
    }
}
