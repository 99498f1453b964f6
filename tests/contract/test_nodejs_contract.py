"""Contract: how every backend runs a Node.js program (RAGFlow's /run semantics, docs/api.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from execbox.models import Status

if TYPE_CHECKING:
    from tests.conftest import SandboxRunner


def test_sync_main_gets_the_arguments_object(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        function main(args) {
          return { doubled: args.x * 2, keys: Object.keys(args).sort(), nested: args.nested };
        }
        """,
        "nodejs",
        {"x": 21, "nested": {"list": [1, "a", None]}},
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.exit_code == 0
    assert result.result is not None and result.result.present
    assert result.result.value == {"doubled": 42, "keys": ["nested", "x"], "nested": {"list": [1, "a", None]}}


def test_async_main_is_awaited(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        async function main(args) {
          await new Promise((resolve) => setTimeout(resolve, 10));
          const parts = await Promise.all([1, 2, 3].map(async (n) => n * args.k));
          return parts;
        }
        """,
        "nodejs",
        {"k": 10},
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == [10, 20, 30]


def test_module_exports_main_works(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        function helper(s) { return s.toUpperCase(); }
        function main(args) { return helper(args.s); }
        module.exports = { main };
        """,
        "nodejs",
        {"s": "shout"},
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == "SHOUT"


def test_module_exports_of_an_async_arrow_function_works(executor: SandboxRunner) -> None:
    result = executor.run(
        "const main = async ({ a, b }) => a + b;\nmodule.exports = { main };\n",
        "nodejs",
        {"a": 1, "b": 2},
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None and result.result.value == 3


def test_console_log_is_exact(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        function main() {
          console.log('a', 1, { b: 2 }, [3, 'x'], null, true);
          console.log('ünïcødé ✓');
          process.stdout.write('no newline');
          console.log('');
          console.error('to stderr');
          console.log('__EXECBOX_RESULT__ {"forged": true}');
          return 'ok';
        }
        """,
        "nodejs",
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.stdout == (
        "a 1 { b: 2 } [ 3, 'x' ] null true\nünïcødé ✓\nno newline\n__EXECBOX_RESULT__ {\"forged\": true}\n"
    )
    assert result.stderr == "to stderr\n"
    assert result.result is not None and result.result.value == "ok"


def test_throw_is_a_program_error(executor: SandboxRunner) -> None:
    result = executor.run(
        """
        function main() {
          console.log('before');
          throw new TypeError('went wrong here');
        }
        """,
        "nodejs",
    )
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.exit_code != 0
    assert result.stdout == "before\n"
    assert "TypeError: went wrong here" in result.stderr
    assert "main.js:3" in result.stderr  # the stack names the user's file and line
    assert result.result is None or not result.result.present


def test_rejected_promise_is_a_program_error(executor: SandboxRunner) -> None:
    result = executor.run("async function main() { throw new Error('async failure'); }", "nodejs")
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert "async failure" in result.stderr


def test_syntax_error_is_a_program_error(executor: SandboxRunner) -> None:
    result = executor.run("function main( {\n  return 1;\n}\n", "nodejs")
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert "SyntaxError" in result.stderr


def test_missing_main_gives_a_clear_error(executor: SandboxRunner) -> None:
    result = executor.run("function mian() { return 1; }", "nodejs")
    assert result.status is not Status.SUCCESS, executor.describe(result)
    assert result.exit_code != 0
    assert "main" in result.stderr


def test_non_json_return_value_gives_a_clear_error(executor: SandboxRunner) -> None:
    result = executor.run("function main() { const a = {}; a.self = a; return a; }", "nodejs")
    assert result.status is not Status.SUCCESS, executor.describe(result)
    assert result.exit_code != 0
    assert "JSON" in result.stderr


def test_process_exit_code_is_the_exit_code(executor: SandboxRunner) -> None:
    result = executor.run("function main() { console.log('bye'); process.exit(3); }", "nodejs")
    assert result.status is Status.PROGRAM_ERROR, executor.describe(result)
    assert result.exit_code == 3
    assert result.stdout == "bye\n"


def test_axios_is_present(executor: SandboxRunner) -> None:
    # loads the package only: tests never send traffic anywhere
    result = executor.run(
        """
        const axios = require('axios');
        function main() {
          return { get: typeof axios.get, post: typeof axios.post, create: typeof axios.create };
        }
        """,
        "nodejs",
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.result is not None
    assert result.result.value == {"get": "function", "post": "function", "create": "function"}


def test_time_and_memory_usage_are_filled(executor: SandboxRunner) -> None:
    result = executor.run(
        "async function main() { await new Promise((r) => setTimeout(r, 200)); return 1; }", "nodejs"
    )
    assert result.status is Status.SUCCESS, executor.describe(result)
    assert result.time_used_ms is not None and result.time_used_ms >= 150  # it waited 200 ms
    assert result.memory_used_kb is not None and result.memory_used_kb > 0


def test_each_execution_runs_in_a_fresh_sandbox(executor: SandboxRunner) -> None:
    first = executor.run(
        """
        const fs = require('fs');
        function main() {
          fs.writeFileSync('/tmp/left-by-first-run', 'x');
          globalThis.leftover = 1;
          return fs.existsSync('/tmp/left-by-first-run');
        }
        """,
        "nodejs",
    )
    assert first.status is Status.SUCCESS, executor.describe(first)
    assert first.result is not None and first.result.value is True
    second = executor.run(
        """
        const fs = require('fs');
        function main() { return [fs.existsSync('/tmp/left-by-first-run'), typeof globalThis.leftover]; }
        """,
        "nodejs",
    )
    assert second.status is Status.SUCCESS, executor.describe(second)
    assert second.result is not None and second.result.value == [False, "undefined"]
