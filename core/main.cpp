// ablate-train: `ablate-train prepare-data ...` or `ablate-train --flag value ...` (see core/cli.cpp).
#include <cstring>

#include "core/train.h"

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "prepare-data") == 0) return ablate::prepare_data_cli(argc - 1, argv + 1);
  return ablate::train_cli(argc, argv);
}
