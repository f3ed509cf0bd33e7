// ablate-train's flag parsing, separated from running so tests can check what a command line resolves to.
#pragma once
#include <ostream>
#include <string>
#include <vector>

#include "core/config.h"

namespace ablate {

// Parses ablate-train's arguments (argv without the program name) into c: seed aliases (-lr, -wd, -clip, -attn,
// --attention_type, optimizer names like adamw_8bit) are normalised and the model flags validated. Returns -1 to
// go on and train, or the exit code to stop with (0 after --help, 2 after an error written to err).
int parse_train_args(const std::vector<std::string>& args, TrainConfig& c, std::ostream& out, std::ostream& err);

}  // namespace ablate
