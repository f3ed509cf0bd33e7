// `ablate-train --nproc N`: starts N ranks of this very program on this machine, like torchrun --nproc_per_node.
#pragma once
#include <string>
#include <vector>

namespace ablate::dist {

// Runs /proc/self/exe with `args` (argv without the program name) N times, child r with RANK=r, LOCAL_RANK=r,
// WORLD_SIZE=N, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT. One node of several (ABLATE_NNODES > 1, this one
// ABLATE_NODE_RANK; set by the worker for a gang of multi-GPU members): RANK = node_rank * N + r, WORLD_SIZE =
// nnodes * N, and MASTER_ADDR/MASTER_PORT from the environment (rank 0's node hosts the store).
// Child output is copied line by line: global rank 0's as is, the others' prefixed with "[rank r] ". SIGINT/SIGTERM/SIGHUP are forwarded to every child. When a rank
// fails, the others get SIGTERM (SIGKILL 10 s later). Returns 0 when all succeed, else the exit code of the first
// rank that failed (128 + signal for a signal).
int launch_local(int nproc, const std::vector<std::string>& args);

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
int free_local_port();

// args without `flag` and its value (`flag V` or `flag=V`).
std::vector<std::string> strip_flag(const std::vector<std::string>& args, const std::string& flag);

}  // namespace ablate::dist
