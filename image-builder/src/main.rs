//! `atoll-image`: command-line front end of the `atoll_image` library.

use std::path::PathBuf;

use anyhow::Context;
use atoll_image::initramfs::{self, AddSpec, InitramfsSpec};
use atoll_image::kernel::{self, KernelBuildOptions};
use atoll_image::oci::bench;
use atoll_image::oci::builtin;
use atoll_image::oci::convert::{self, Format};
use atoll_image::oci::import;
use atoll_image::oci::pull;
use atoll_image::oci::store::{self, Store};
use atoll_image::oci::unpack::{self, UnpackLimits};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atoll-image",
    version,
    about = "Builds Atoll guest kernels and initramfs images; pulls, imports and converts OCI images"
)]
struct Cli {
    /// The image store.
    #[arg(long, global = true, env = store::STORE_ENV, default_value = store::DEFAULT_STORE_ROOT)]
    store: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or reuse from the cache) the guest kernel: vmlinux, bzImage, config.
    Kernel {
        /// Also copy vmlinux, bzImage and config into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Cache root; the kernel goes to <cache>/kernel/<hash>/.
        #[arg(long, env = kernel::CACHE_ENV, default_value = kernel::DEFAULT_CACHE_ROOT)]
        cache: PathBuf,
        /// Use this Kconfig fragment instead of the built-in atoll-guest.config.
        #[arg(long)]
        fragment: Option<PathBuf>,
        /// Parallel make jobs (default: number of CPUs).
        #[arg(long, short)]
        jobs: Option<usize>,
    },
    /// Write an uncompressed newc initramfs with /init and the base layout.
    Initramfs {
        /// The static atoll-init binary, stored as /init.
        #[arg(long)]
        init: PathBuf,
        /// Extra host file or directory tree, as HOST:GUEST (repeatable).
        #[arg(long = "add", value_name = "HOST:GUEST")]
        add: Vec<AddSpec>,
        /// A static busybox to add as /bin/busybox with its applet links in /bin.
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Output file (written atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Import an OCI image layout directory or a `docker save` tarball.
    Import {
        path: PathBuf,
        /// Store the image under this name (only when the input holds one image).
        #[arg(long)]
        name: Option<String>,
        /// Import only the image with this tag (layout ref name or RepoTag).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Pull an image from a registry (linux/amd64 from multi-platform indexes).
    Pull {
        reference: String,
        /// Use HTTP instead of HTTPS (a local registry).
        #[arg(long)]
        plain_http: bool,
    },
    /// Time OCI layout -> erofs: `import` + `convert` against `umoci unpack` +
    /// `mkfs.erofs`, on the same layout in the same run.
    Bench {
        /// The OCI layout to convert (written first from --from-rootfs if missing).
        #[arg(long)]
        layout: PathBuf,
        #[arg(long, default_value = "latest")]
        tag: String,
        /// A root filesystem tree (e.g. debootstrap'd) to build the layout from.
        #[arg(long)]
        from_rootfs: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Scratch directory (default: a temp dir next to the layout).
        #[arg(long)]
        work: Option<PathBuf>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Build the default image `atoll/busybox:latest` from the host's static busybox
    /// and record it in the store.
    Builtin {
        /// The static busybox binary to put in the image.
        #[arg(long, default_value = builtin::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
    },
    /// List the images in the store.
    Ls,
    /// Show an image's manifest, config and layers as JSON.
    Inspect { reference: String },
    /// Remove an image; blobs no image uses any more are collected.
    Rm { reference: String },
    /// Write an image's flattened root filesystem into DIR (created, or empty).
    Unpack { reference: String, dir: PathBuf },
    /// Convert an image to a VM root filesystem image (cached by manifest digest);
    /// `<FILE>.config.json` gets the entrypoint, cmd, env, user and workdir.
    Convert {
        reference: String,
        #[arg(long, default_value = "erofs")]
        format: Format,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn progress(line: &str) {
    eprintln!("atoll-image: {line}");
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain, no backtrace.
            eprintln!("atoll-image: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Kernel {
            out,
            cache,
            fragment,
            jobs,
        } => {
            let mut opts = KernelBuildOptions::new(cache);
            opts.out_dir = out;
            if let Some(path) = fragment {
                opts.fragment = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read fragment {}", path.display()))?;
            }
            if let Some(jobs) = jobs {
                opts.jobs = jobs.max(1);
            }
            let k = kernel::build_kernel(&opts, &progress)?;
            progress(&format!(
                "kernel {} ({} options, PVH entry {:#x}): {}",
                k.hash,
                k.options_set,
                k.pvh_entry,
                k.dir.display()
            ));
            println!("{}", k.dir.display());
        }
        Cmd::Initramfs {
            init,
            add,
            busybox,
            output,
        } => {
            let mut spec = InitramfsSpec::new(init, add);
            spec.busybox = busybox;
            let s = initramfs::write_initramfs(&spec, &output)?;
            progress(&format!(
                "wrote {} ({} entries, {} bytes)",
                output.display(),
                s.entries,
                s.bytes
            ));
        }
        Cmd::Import { path, name, tag } => {
            let store = Store::open(&cli.store)?;
            for i in import::import(&store, &path, name.as_deref(), tag.as_deref())? {
                progress(&format!("imported {} ({})", i.name, i.manifest));
                println!("{}", i.name);
            }
        }
        Cmd::Pull {
            reference,
            plain_http,
        } => {
            let store = Store::open(&cli.store)?;
            let p = pull::pull(
                &store,
                &reference,
                &pull::PullOptions {
                    plain_http,
                    ..Default::default()
                },
            )?;
            progress(&format!("pulled {} ({})", p.name, p.manifest));
            println!("{}", p.name);
        }
        Cmd::Bench {
            layout,
            tag,
            from_rootfs,
            runs,
            work,
            json,
        } => {
            if !layout.join("index.json").is_file() {
                let rootfs = from_rootfs.context("--layout does not exist: give --from-rootfs")?;
                progress(&format!(
                    "writing {} from {}",
                    layout.display(),
                    rootfs.display()
                ));
                bench::layout_from_rootfs(&rootfs, &layout, &tag)?;
            }
            let work = work.unwrap_or_else(|| {
                let mut w = layout.clone().into_os_string();
                w.push(".bench-work");
                PathBuf::from(w)
            });
            let opts = bench::BenchOptions {
                layout,
                tag,
                runs,
                work,
                exe: std::env::current_exe()?,
            };
            let report = bench::run(&opts, &progress)?;
            let text = serde_json::to_string_pretty(&report)?;
            println!("{text}");
            if let Some(p) = json {
                std::fs::write(&p, text)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
        }
        Cmd::Builtin { busybox } => {
            let store = Store::open(&cli.store)?;
            let d = builtin::build(&store, &busybox)?;
            progress(&format!("built {} ({d})", builtin::BUILTIN_REF));
            println!("{}", builtin::BUILTIN_REF);
        }
        Cmd::Ls => {
            let store = Store::open(&cli.store)?;
            println!("{:<50} {:<19} {:>12}", "NAME", "MANIFEST", "SIZE");
            for (name, d) in store.refs()? {
                let size = match store.image(&d) {
                    Ok(img) => img
                        .manifest
                        .layers()
                        .iter()
                        .map(|l| l.size())
                        .sum::<u64>()
                        .to_string(),
                    Err(_) => "broken".to_owned(),
                };
                println!("{name:<50} {:<19} {size:>12}", &d.to_string()[..19]);
            }
        }
        Cmd::Inspect { reference } => {
            let store = Store::open(&cli.store)?;
            let (name, d) = store.resolve(&reference)?;
            let img = store.image(&d)?;
            let layers: Vec<_> = img
                .manifest
                .layers()
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "digest": l.digest().to_string(),
                        "size": l.size(),
                        "mediaType": l.media_type().to_string(),
                    })
                })
                .collect();
            let out = serde_json::json!({
                "name": name,
                "manifest_digest": d.to_string(),
                "config_digest": img.config_digest.to_string(),
                "size": img.manifest.layers().iter().map(|l| l.size()).sum::<u64>(),
                "layers": layers,
                "config": img.config,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Rm { reference } => {
            let store = Store::open(&cli.store)?;
            let name = store.remove_ref(&reference)?;
            let gc = store.gc()?;
            progress(&format!(
                "removed {name}; collected {} blobs ({} bytes), {} converted images",
                gc.blobs_removed, gc.bytes_removed, gc.images_removed
            ));
        }
        Cmd::Unpack { reference, dir } => {
            let store = Store::open(&cli.store)?;
            let _lock = store.lock_shared()?;
            let (_, d) = store.resolve(&reference)?;
            let img = store.image(&d)?;
            match std::fs::read_dir(&dir) {
                Ok(mut it) => {
                    if it.next().is_some() {
                        anyhow::bail!(
                            "{} is not empty: unpack needs a new or empty directory",
                            dir.display()
                        );
                    }
                }
                Err(_) => std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?,
            }
            let layers: Vec<_> = img
                .layer_digests()?
                .iter()
                .map(|l| store.blob_path(l))
                .collect();
            let s = unpack::unpack_layers(&layers, &dir, UnpackLimits::default())?;
            progress(&format!(
                "unpacked {} layers, {} entries, {} bytes into {}{}",
                s.layers,
                s.entries,
                s.bytes,
                dir.display(),
                if s.skipped_devices > 0 {
                    format!(" ({} device nodes skipped: not root)", s.skipped_devices)
                } else {
                    String::new()
                }
            ));
        }
        Cmd::Convert {
            reference,
            format,
            output,
        } => {
            let store = Store::open(&cli.store)?;
            let (name, d) = store.resolve(&reference)?;
            let c = convert::convert(&store, &d, format, &output, UnpackLimits::default())?;
            if c.built {
                progress(&format!(
                    "{name}: unpacked in {:.2}s, mkfs.{format} in {:.2}s",
                    c.unpack_time.as_secs_f64(),
                    c.mkfs_time.as_secs_f64()
                ));
            } else {
                progress(&format!("{name}: reused {}", c.cached.display()));
            }
            progress(&format!(
                "wrote {} and {}",
                output.display(),
                convert::config_path_for(&output).display()
            ));
        }
    }
    Ok(())
}
