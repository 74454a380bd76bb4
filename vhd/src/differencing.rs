//! How a differencing image finds its parent: encoding parent locators at creation and turning
//! them back into candidate paths on open.
//!
//! A child records its parent three ways, in this order of preference when opening:
//! `W2ru` (path relative to the child's directory, UTF-16LE), `W2ku` (absolute path, UTF-16LE)
//! and `MacX` (a `file://` URL, UTF-8); the header also holds the parent's file name. Whatever
//! path is found, the parent is accepted only if its footer UUID equals the one in the child's
//! header, so a moved or replaced parent is an error rather than silently wrong data. Loops and
//! over-long chains are refused by [`crate::Image`]'s opener, which tracks the chain.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::dynamic_header::{decode_utf16, DynamicHeader};
use crate::error::{Error, Result};
use crate::wire::read_exact_at;

/// Locator data longer than this is ignored: no real path needs it, and a hostile file must not
/// make the opener allocate much.
const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// One locator to store in a new child: platform code and data bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocatorData {
    pub code: [u8; 4],
    pub bytes: Vec<u8>,
}

/// The locators a new child of `parent` at `child` gets: relative, absolute and URL forms.
pub(crate) fn locators_for(child: &Path, parent: &Path) -> Result<Vec<LocatorData>> {
    let parent_abs = parent
        .canonicalize()
        .map_err(Error::io("resolve the parent path"))?;
    let child_dir = dir_of(child)
        .canonicalize()
        .map_err(Error::io("resolve the child's directory"))?;
    let relative = relative_path(&child_dir, &parent_abs);
    let utf16le = |p: &Path| -> Vec<u8> {
        p.to_string_lossy()
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect()
    };
    Ok(vec![
        LocatorData {
            code: *b"W2ru",
            bytes: utf16le(&relative),
        },
        LocatorData {
            code: *b"W2ku",
            bytes: utf16le(&parent_abs),
        },
        LocatorData {
            code: *b"MacX",
            bytes: format!("file://{}", percent_encode(&parent_abs.to_string_lossy())).into_bytes(),
        },
    ])
}

/// Paths where `child`'s parent may be, best first, decoded from the locators and the parent
/// name in `header`. Unknown platform codes and over-long locators are skipped.
pub(crate) fn candidates(
    child: &Path,
    file: &File,
    header: &DynamicHeader,
) -> Result<Vec<PathBuf>> {
    let dir = dir_of(child);
    let mut relative = Vec::new();
    let mut absolute = Vec::new();
    for loc in header.locators.iter().filter(|l| l.is_used()) {
        if loc.data_length == 0 || loc.data_length > MAX_LOCATOR_LEN {
            continue;
        }
        let mut data = vec![0u8; loc.data_length as usize];
        read_exact_at(file, &mut data, loc.data_offset, "read a parent locator")?;
        match &loc.platform_code {
            b"W2ru" => relative.push(windows_path(&decode_utf16(&data, u16::from_le_bytes))),
            b"W2ku" => absolute.push(windows_path(&decode_utf16(&data, u16::from_le_bytes))),
            b"MacX" => {
                let url = String::from_utf8_lossy(&data);
                let url = url.trim_end_matches('\0');
                if let Some(rest) = url.strip_prefix("file://") {
                    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
                    absolute.push(PathBuf::from(percent_decode(rest)));
                }
            }
            _ => {}
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for p in relative.into_iter().chain(absolute) {
        let p = if p.is_absolute() { p } else { dir.join(p) };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if !header.parent_name.is_empty() {
        // The name field holds a file name (some writers put a path): try it beside the child.
        let name = windows_path(&header.parent_name);
        if let Some(file_name) = name.file_name() {
            let p = dir.join(file_name);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The directory holding `path` ("." for a bare file name).
pub(crate) fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A Windows-style path with `\` separators as a local path (`.\a\b.vhd` → `./a/b.vhd`).
fn windows_path(s: &str) -> PathBuf {
    PathBuf::from(s.trim_end_matches('\0').replace('\\', "/"))
}

/// `to` relative to the directory `from` (both absolute): `./name`, `../x/name`, ...
pub(crate) fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    if common == from.len() {
        out.push(".");
    }
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// Percent-encodes the bytes a `file://` URL path may not contain literally.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; malformed escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            PathBuf::from("./p.vhd")
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            PathBuf::from("../c/p.vhd")
        );
        assert_eq!(
            relative_path(Path::new("/"), Path::new("/p.vhd")),
            PathBuf::from("./p.vhd")
        );
    }

    #[test]
    fn url_coding() {
        let s = "/tmp/a b/ü%.vhd";
        assert_eq!(percent_decode(&percent_encode(s)), s);
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("x%zz"), "x%zz");
    }

    #[test]
    fn windows_separators() {
        assert_eq!(windows_path(".\\a\\b.vhd\0"), PathBuf::from("./a/b.vhd"));
    }
}
