//! Checkpoint folder cases: a saved checkpoint `ckpt` with files missing, emptied, replaced by
//! garbage, by a folder or by a link, extra files, the folder itself a file or a link, a
//! `ckpt.old` (a file, an empty folder, a copy) with or without `ckpt`, temporary
//! `ckpt.tmp-<pid>` folders of dead, live and this process, and a broken `config.json` (the
//! config generator's mutations of the saved one). Then the folder is loaded, or saved onto and
//! loaded, or loaded and saved onto.

use std::path::Path;

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Value;

use torchscale_core::Error;

use super::base::{clear, load_and_use, CkptFile, Env, Verdict, Violation};
use super::configs::{self, Edit, Kind};

/// What a link points at (always inside the case's folder).
#[derive(Debug, Clone, Copy)]
pub enum LinkTo {
    /// A path that does not exist.
    Nothing,
    /// A folder.
    Folder,
    /// A copy of the file it replaces.
    Copy,
}

/// What stands at `ckpt.old`.
#[derive(Debug, Clone, Copy)]
pub enum OldKind {
    /// A regular file.
    File,
    /// An empty folder.
    EmptyFolder,
    /// A complete copy of the checkpoint.
    Copy,
}

/// Whose `ckpt.tmp-<pid>` folder it is.
#[derive(Debug, Clone, Copy)]
pub enum TmpOwner {
    /// A pid no process can have.
    Dead,
    /// pid 1, alive.
    Alive,
    /// This process.
    Me,
    /// Not a pid.
    NotAPid,
}

/// One change to the folder.
#[derive(Debug, Clone)]
pub enum FolderOp {
    /// A file removed.
    Remove(CkptFile),
    /// A file emptied.
    Empty(CkptFile),
    /// A file's bytes replaced.
    Garbage(CkptFile, Vec<u8>),
    /// A file replaced by a folder.
    FileIsFolder(CkptFile),
    /// A file replaced by a link.
    FileIsLink(CkptFile, LinkTo),
    /// An extra file in the folder.
    Extra(&'static str),
    /// `ckpt` itself replaced by a regular file.
    DirIsFile,
    /// `ckpt` itself replaced by a link to a copy of it.
    DirIsLink,
    /// `ckpt` removed.
    DirRemoved,
    /// Something at `ckpt.old`.
    Old(OldKind),
    /// A temporary folder `ckpt.tmp-<pid>`, as a folder or a file.
    Tmp(TmpOwner, bool),
    /// `config.json` after the config generator's edits.
    Config(Vec<Edit>),
}

/// What is done with the folder afterwards.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Loaded (and used).
    Load,
    /// A good model saved onto it, then loaded.
    SaveThenLoad,
    /// Loaded, then a good model saved onto it.
    LoadThenSave,
}

/// One folder case.
#[derive(Debug, Clone)]
pub struct FolderCase {
    /// Which base checkpoint.
    pub base: usize,
    /// The changes, in order.
    pub ops: Vec<FolderOp>,
    /// Then this.
    pub action: Action,
}

/// A file of the checkpoint folder (not the optimizer file, which is not part of it).
fn file() -> BoxedStrategy<CkptFile> {
    select(vec![CkptFile::Model, CkptFile::Trainer, CkptFile::Config]).boxed()
}

fn op() -> BoxedStrategy<FolderOp> {
    let link = select(vec![LinkTo::Nothing, LinkTo::Folder, LinkTo::Copy]);
    let old = select(vec![OldKind::File, OldKind::EmptyFolder, OldKind::Copy]);
    let owner = select(vec![
        TmpOwner::Dead,
        TmpOwner::Alive,
        TmpOwner::Me,
        TmpOwner::NotAPid,
    ]);
    prop_oneof![
        2 => file().prop_map(FolderOp::Remove),
        1 => file().prop_map(FolderOp::Empty),
        1 => (file(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(f, b)| FolderOp::Garbage(f, b)),
        1 => file().prop_map(FolderOp::FileIsFolder),
        1 => (file(), link).prop_map(|(f, l)| FolderOp::FileIsLink(f, l)),
        1 => select(vec!["notes.txt", "model.safetensors.bak", ".tmp", "config.json.old"])
            .prop_map(FolderOp::Extra),
        1 => Just(FolderOp::DirIsFile),
        1 => Just(FolderOp::DirIsLink),
        1 => Just(FolderOp::DirRemoved),
        2 => old.prop_map(FolderOp::Old),
        2 => (owner, any::<bool>()).prop_map(|(o, d)| FolderOp::Tmp(o, d)),
        4 => proptest::collection::vec(configs::edit(Kind::Decoder), 1..4)
            .prop_map(FolderOp::Config),
    ]
    .boxed()
}

/// A folder case: a base, 1 to 3 changes, an action.
pub fn case() -> BoxedStrategy<FolderCase> {
    (
        0usize..2,
        proptest::collection::vec(op(), 1..4),
        select(vec![
            Action::Load,
            Action::SaveThenLoad,
            Action::LoadThenSave,
        ]),
    )
        .prop_map(|(base, ops, action)| FolderCase { base, ops, action })
        .boxed()
}

/// The case in words (the config edits as their JSON text).
pub fn describe(env: &Env, case: &FolderCase) -> String {
    let ops: Vec<String> = case
        .ops
        .iter()
        .map(|op| match op {
            FolderOp::Config(edits) => {
                format!("config.json = {}", edited_config(env, case.base, edits))
            }
            other => format!("{other:?}"),
        })
        .collect();
    format!(
        "{} checkpoint folder after [{}], then {:?}",
        env.bases[case.base].name,
        ops.join("; "),
        case.action
    )
}

fn edited_config(env: &Env, base: usize, edits: &[Edit]) -> String {
    let mut obj = match serde_json::from_str(&env.bases[base].config) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for e in edits {
        e.apply(&mut obj);
    }
    Value::Object(obj).to_string()
}

fn io(what: &str, path: &Path, r: std::io::Result<()>) -> Result<(), Error> {
    r.map_err(|e| Error::file_op(what, path, e))
}

fn sibling(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let mut n = dir.file_name().unwrap_or_default().to_os_string();
    n.push(suffix);
    dir.with_file_name(n)
}

/// Makes the folder: the base checkpoint at `<root>/ckpt`, then the changes.
fn lay_out(env: &Env, root: &Path, case: &FolderCase) -> Result<(), Error> {
    let base = &env.bases[case.base];
    let dir = root.join("ckpt");
    io("write", &dir, base.write(&dir, None))?;
    for op in &case.ops {
        let in_dir = |f: CkptFile| dir.join(f.name());
        match op {
            FolderOp::Remove(f) => clear(&in_dir(*f))?,
            FolderOp::Empty(f) => io("write", &in_dir(*f), std::fs::write(in_dir(*f), b""))?,
            FolderOp::Garbage(f, b) => io("write", &in_dir(*f), std::fs::write(in_dir(*f), b))?,
            FolderOp::FileIsFolder(f) => {
                clear(&in_dir(*f))?;
                io("create", &in_dir(*f), std::fs::create_dir_all(in_dir(*f)))?;
            }
            FolderOp::FileIsLink(f, to) => {
                let target = root.join(format!("target-{}", f.name()));
                clear(&target)?;
                match to {
                    LinkTo::Nothing => {}
                    LinkTo::Folder => io("create", &target, std::fs::create_dir_all(&target))?,
                    LinkTo::Copy => io("write", &target, std::fs::write(&target, base.bytes(*f)))?,
                }
                clear(&in_dir(*f))?;
                if dir.is_dir() {
                    io("link", &in_dir(*f), symlink(&target, &in_dir(*f)))?;
                }
            }
            FolderOp::Extra(name) => {
                if dir.is_dir() {
                    io("write", &dir, std::fs::write(dir.join(name), b"extra"))?;
                }
            }
            FolderOp::DirIsFile => {
                clear(&dir)?;
                io("write", &dir, std::fs::write(&dir, b"not a folder"))?;
            }
            FolderOp::DirIsLink => {
                let real = root.join("real-ckpt");
                clear(&real)?;
                io("write", &real, base.write(&real, None))?;
                clear(&dir)?;
                io("link", &dir, symlink(&real, &dir))?;
            }
            FolderOp::DirRemoved => clear(&dir)?,
            FolderOp::Old(kind) => {
                let old = sibling(&dir, ".old");
                clear(&old)?;
                match kind {
                    OldKind::File => io("write", &old, std::fs::write(&old, b"old"))?,
                    OldKind::EmptyFolder => io("create", &old, std::fs::create_dir_all(&old))?,
                    OldKind::Copy => io("write", &old, base.write(&old, None))?,
                }
            }
            FolderOp::Tmp(owner, as_folder) => {
                let pid = match owner {
                    TmpOwner::Dead => "4000000000".to_string(),
                    TmpOwner::Alive => "1".to_string(),
                    TmpOwner::Me => std::process::id().to_string(),
                    TmpOwner::NotAPid => "x1".to_string(),
                };
                let tmp = sibling(&dir, &format!(".tmp-{pid}"));
                clear(&tmp)?;
                if *as_folder {
                    io("write", &tmp, base.write(&tmp, None))?;
                } else {
                    io("write", &tmp, std::fs::write(&tmp, b"partial"))?;
                }
            }
            FolderOp::Config(edits) => {
                let text = edited_config(env, case.base, edits);
                let p = in_dir(CkptFile::Config);
                if dir.is_dir() {
                    io("write", &p, std::fs::write(&p, &text))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Without symbolic links, a copy of what it would point at.
    match std::fs::read(target) {
        Ok(b) => std::fs::write(link, b),
        Err(_) => Ok(()),
    }
}

/// Lays the folder out and runs the action.
pub fn run(env: &Env, index: u64, case: &FolderCase) -> std::result::Result<Verdict, Violation> {
    let root = match env.case_dir(index) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = lay_out(env, &root, case) {
        return Ok(Err(e));
    }
    let dir = root.join("ckpt");
    match case.action {
        Action::Load => load_and_use(&dir),
        Action::SaveThenLoad => save_and_reload(env, &dir),
        Action::LoadThenSave => {
            // The first refusal is the verdict; both steps run.
            let loaded = load_and_use(&dir)?;
            let saved = save_and_reload(env, &dir)?;
            Ok(loaded.and(saved))
        }
    }
}

/// Saves the good model onto `dir`; once the save succeeded, the folder must load back (a
/// [`Violation`] otherwise).
fn save_and_reload(env: &Env, dir: &Path) -> std::result::Result<Verdict, Violation> {
    if let Err(e) = env.saver.save(dir, None) {
        return Ok(Err(e));
    }
    match load_and_use(dir)? {
        Ok(()) => Ok(Ok(())),
        Err(e) => Err(Violation(format!(
            "the save succeeded but the folder does not load back: {e}"
        ))),
    }
}
