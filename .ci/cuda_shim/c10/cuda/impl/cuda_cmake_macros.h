// Compile-check shim: CPU builds of torch ship the c10/cuda headers without this generated file.
// CUDA builds of torch generate it with this one definition; .ci/nvcc_check puts this folder
// last on the include path so a real one wins. Never used for a build that runs.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
