//! Command-line arguments (clap derive). The interface follows qemu-img where users know it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Convert, inspect and check virtual-machine disk images: raw, VHD (Virtual PC, Hyper-V, Xen,
/// Azure), VHDX (Hyper-V, with .avhdx checkpoints) and qcow2 (KVM).
#[derive(Debug, Parser)]
#[command(
    name = "vdconv",
    version,
    long_about = "Convert, inspect and check virtual-machine disk images: raw, VHD (Virtual PC, \
Hyper-V, Xen, Azure), VHDX (Hyper-V, with .avhdx checkpoints) and qcow2 (KVM).\n\n\
Stable output: `--output json` of info, check, map and digest (versioned by a \"schema\" field), \
the human output of digest, and the exit codes. Human output of other commands may change; \
stderr is never stable.\n\n\
Exit codes: 0 success; 1 runtime error (compare: images differ); 2 usage error (compare: error); \
3 check found corruption; 4 check found only leaks; 5 unsupported format or feature; \
6 parent/backing file missing, denied or mismatched; 130 interrupted."
)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Human,
    /// For scripts (stable).
    Json,
}

/// Progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// A bar with bytes, rate and ETA on stderr.
    Bar,
    /// JSON lines on stderr.
    Json,
    /// Nothing.
    None,
}

/// Conversion presets for a target platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Fixed VHD, size rounded up to a whole MiB (Azure rejects anything else).
    Azure,
    /// VHDX with 4096-byte physical sectors and 32 MiB blocks, as Hyper-V makes them.
    Hyperv,
    /// VHD in the Xen (blktap) dialect, with a batmap.
    Xen,
    /// qcow2 v3 (compat 1.1).
    Kvm,
}

/// qemu-img convert options that scripts pass: some are accepted (vdconv already does what
/// they ask, or they only tune qemu), the others get a message instead of a bare parse error.
#[derive(Debug, Clone, Args)]
pub struct QemuConvertArgs {
    /// Output cache mode: vdconv always flushes its output before it returns.
    #[arg(short = 't', value_name = "CACHE", hide = true)]
    pub cache: Option<String>,
    /// Source cache mode.
    #[arg(short = 'T', value_name = "CACHE", hide = true)]
    pub src_cache: Option<String>,
    /// Out-of-order writes: vdconv reads in parallel and writes in order.
    #[arg(short = 'W', hide = true)]
    pub out_of_order: bool,
    /// Parallel coroutines: vdconv sizes its readers to the machine.
    #[arg(short = 'm', value_name = "N", hide = true)]
    pub coroutines: Option<u32>,
    /// Skip creating the target: not supported.
    #[arg(short = 'n', hide = true)]
    pub no_create: bool,
    /// Sparse detection size: not supported.
    #[arg(short = 'S', value_name = "SIZE", hide = true)]
    pub sparse_size: Option<String>,
    /// Image options instead of file names: not supported.
    #[arg(long = "image-opts", hide = true)]
    pub image_opts: bool,
    /// Target image options instead of a file name: not supported.
    #[arg(long = "target-image-opts", hide = true)]
    pub target_image_opts: bool,
}

impl QemuConvertArgs {
    /// Refuses what vdconv cannot do, with a message, before anything is opened.
    pub fn refuse_unsupported(&self) -> Option<&'static str> {
        if self.no_create {
            Some("-n (write into an existing image) is not supported: vdconv always creates the output (-B writes a delta over an existing image)")
        } else if self.sparse_size.is_some() {
            Some("-S is not supported: vdconv leaves every all-zero cluster or block of the output unallocated")
        } else if self.image_opts || self.target_image_opts {
            Some("--image-opts and --target-image-opts are not supported: name the files, and use --open-option K=V or -o K=V")
        } else {
            None
        }
    }
}

/// Options for opening existing images.
#[derive(Debug, Clone, Args)]
pub struct OpenArgs {
    /// Follow no parent/backing references.
    #[arg(long)]
    pub no_backing: bool,
    /// Another directory where parent/backing files may be found (repeatable).
    #[arg(long = "backing-dir", value_name = "DIR")]
    pub backing_dirs: Vec<PathBuf>,
    /// Use a parent whose identity (VHD UUID, VHDX DataWriteGuid) does not match.
    #[arg(long)]
    pub ignore_parent_id: bool,
    /// Open option for the source format, K=V (e.g. size_rule=chs|current for VHD).
    #[arg(long = "open-option", value_name = "K=V")]
    pub open_options: Vec<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what an image is: format, sizes, allocation, parent, format-specific facts.
    Info {
        /// Format of the image (probed when absent).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Show every layer of the parent/backing chain.
        #[arg(long)]
        backing_chain: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        image: PathBuf,
    },
    /// Convert an image (with its chain) to another format, atomically.
    Convert {
        /// Source format (probed when absent).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format.
        #[arg(short = 'O', long = "output-format")]
        output_format: Option<String>,
        /// Output options, K=V[,K=V...] (repeatable).
        #[arg(short = 'o', long = "options", value_name = "K=V,...")]
        options: Vec<String>,
        /// Write only what differs from this existing image, and make it the output's parent.
        #[arg(short = 'B', long = "backing")]
        backing: Option<String>,
        /// Format of the -B image (probed when absent).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// Compress the output (qcow2).
        #[arg(short = 'c', long)]
        compress: bool,
        /// Show a progress bar.
        #[arg(short = 'p')]
        progress_flag: bool,
        /// Progress display (default: a bar on a terminal or with -p, nothing otherwise).
        #[arg(long = "progress", value_enum)]
        progress: Option<ProgressArg>,
        /// Replace an existing destination.
        #[arg(long)]
        force: bool,
        /// Re-read the output and compare its digest with the source's; remove it on mismatch.
        #[arg(long)]
        verify: bool,
        /// Preset for a target platform.
        #[arg(long, value_enum)]
        target: Option<Target>,
        /// Convert every layer of the source chain and link them in the target format.
        #[arg(long)]
        keep_chain: bool,
        /// Read an internal snapshot (qcow2) instead of the active layer.
        #[arg(short = 'l', long = "snapshot")]
        snapshot: Option<String>,
        /// qemu-img options with no vdconv meaning.
        #[command(flatten)]
        qemu: QemuConvertArgs,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// Source image (required, except with `-o help`).
        src: Option<PathBuf>,
        /// Destination image (required, except with `-o help`).
        dst: Option<PathBuf>,
    },
    /// Create a new empty image (or a differencing/overlay image over a parent).
    Create {
        /// Format of the new image (default: from the file name's extension).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Options, K=V[,K=V...] (repeatable).
        #[arg(short = 'o', long = "options", value_name = "K=V,...")]
        options: Vec<String>,
        /// Parent/backing image.
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Format of the parent (probed when absent).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
        /// The new image (required, except with `-o help`).
        image: Option<PathBuf>,
        /// Size, with optional K, M, G, T, P suffix (binary); defaults to the parent's.
        size: Option<String>,
    },
    /// Check an image's metadata for corruption and leaks.
    Check {
        /// Format of the image (probed when absent).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Repair: `leaks` (qcow2) frees leaked clusters in place.
        #[arg(short = 'r', long = "repair")]
        repair: Option<String>,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        image: PathBuf,
    },
    /// Compare the guest content of two images (exit 0 identical, 1 different, 2 error).
    Compare {
        /// Format of the first image.
        #[arg(short = 'f')]
        format_a: Option<String>,
        /// Format of the second image.
        #[arg(short = 'F')]
        format_b: Option<String>,
        /// Strict: images of different sizes differ (by default the larger one's tail must be
        /// zero), and so do ranges allocated differently (data, zero or nothing), as qemu-img -s.
        #[arg(short = 's', long)]
        strict: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
    },
    /// Print the allocation map of an image chain.
    Map {
        /// Format of the image (probed when absent).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format (JSON as `qemu-img map --output=json`).
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        image: PathBuf,
    },
    /// Digest the guest content (human output is `HEX  IMAGE`, like sha256sum).
    Digest {
        /// Format of the image (probed when absent).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// `sparse-sha256` (default; parallel, skips unallocated ranges) or `sha256`
        /// (equal to sha256sum of the raw image).
        #[arg(long, default_value = "sparse-sha256")]
        algorithm: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Show a progress bar.
        #[arg(short = 'p')]
        progress_flag: bool,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        image: PathBuf,
    },
    /// Merge a differencing/overlay image into its parent.
    Commit {
        /// Format of the image (probed when absent).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Show a progress bar.
        #[arg(short = 'p')]
        progress_flag: bool,
        /// Keep the child as it is (qemu-img's -d): always the case here, accepted for scripts.
        #[arg(short = 'd')]
        keep: bool,
        /// Open options.
        #[command(flatten)]
        open: OpenArgs,
        /// The differencing/overlay image.
        image: PathBuf,
    },
}
