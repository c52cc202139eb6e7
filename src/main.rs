//! `cairn`: an etcd-compatible member. All the work is in `cairn-server`.

fn main() -> std::process::ExitCode {
    cairn_server::cli::main()
}
