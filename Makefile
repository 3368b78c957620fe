# A thin wrapper over CMake. ./scripts/setup installs the Debian packages and
# then calls these targets; `make help` lists them.
BUILD      ?= build
ASAN_BUILD ?= build-asan
JOBS       ?= $(shell nproc)
CMAKE_ARGS ?=
LOOM       := $(BUILD)/cmd/loom/loom
SOURCES     = $(shell git ls-files --cached --others --exclude-standard '*.c' '*.h' 2>/dev/null || find engine ops consumers api cmd tests -name '*.[ch]')

.PHONY: help build run test check asan format format-check clean

help:
	@echo "make build         configure and build into $(BUILD)/ (warnings are errors)"
	@echo "make run           build, then run 'loom dev' (private Postgres; Ctrl-C stops it)"
	@echo "make test          format check, build, the whole test suite, then again under ASan+UBSan"
	@echo "make check         build and run the test suite once (no sanitizers)"
	@echo "make asan          build into $(ASAN_BUILD)/ with ASan+UBSan and run the test suite"
	@echo "make format        apply .clang-format to every C file"
	@echo "make format-check  fail when a C file is not formatted"
	@echo "make clean         remove the build directories"

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DLOOM_WERROR=ON $(CMAKE_ARGS)

build: $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(LOOM) dev

check: build
	cd $(BUILD) && ctest --output-on-failure -j 2

$(ASAN_BUILD)/build.ninja:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DLOOM_WERROR=ON -DLOOM_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=Debug $(CMAKE_ARGS)

asan: $(ASAN_BUILD)/build.ninja
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j 2

test: format-check check asan

format:
	clang-format -i $(SOURCES)

format-check:
	@clang-format --dry-run --Werror $(SOURCES) && echo "format-check: all C files formatted"

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
