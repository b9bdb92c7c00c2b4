//! Where things are: the workspace, its target folder and the image caches under it.

use std::path::PathBuf;

/// The Rust target of every binary that runs in a guest or in the box.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The workspace root (the parent of this crate's folder).
pub fn workspace() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target folder for this workspace (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace().join(dir)
            }
        }
        _ => workspace().join("target"),
    }
}

/// Root of everything `cargo xtask images` and the box build.
pub fn images_root() -> PathBuf {
    target_dir().join("ditto-images")
}

/// Downloaded packages and unpacked kernels.
pub fn cache_dir() -> PathBuf {
    images_root().join("cache")
}

/// The guest images: `vmlinuz`, `initramfs.img`, `rootfs.ext4`.
pub fn guest_dir() -> PathBuf {
    images_root().join("guest")
}

/// The KVM test box's own kernel and initramfs.
pub fn box_dir() -> PathBuf {
    images_root().join("box")
}

/// Release builds for the guest and the box.
pub fn musl_release_dir() -> PathBuf {
    target_dir().join(MUSL_TARGET).join("release")
}
