//! The `tollgate` binary: parses the command line and hands over to `tollgate::cli`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(tollgate::cli::main());
}
