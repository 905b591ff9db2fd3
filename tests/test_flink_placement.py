"""transforms.flink_placement against Flink's own key-group assignment, run in a JVM from the
job server jar: random keys at several parallelisms, and the keys the project places."""
import random
import subprocess

import pytest

from transforms.flink_placement import (default_max_parallelism, placed_names, subtask_of_int,
                                        subtask_of_key, subtask_of_str)

pytestmark = pytest.mark.flink

_JAVA = """
import java.nio.ByteBuffer;
import org.apache.flink.runtime.state.KeyGroupRangeAssignment;
public class KeyGroups {
  public static void main(String[] args) {
    int parallelism = Integer.parseInt(args[0]);
    int groups = KeyGroupRangeAssignment.computeDefaultMaxParallelism(parallelism);
    StringBuilder out = new StringBuilder(groups + "\\n");
    for (int i = 1; i < args.length; i++) {
      ByteBuffer key = ByteBuffer.wrap(java.util.HexFormat.of().parseHex(args[i]));
      out.append(KeyGroupRangeAssignment.assignKeyToParallelOperator(key, groups, parallelism))
         .append('\\n');
    }
    System.out.print(out);
  }
}
"""


@pytest.fixture(scope="module")
def flink_subtasks(tmp_path_factory, flink_job_server_jar):
    """keys → the subtasks Flink assigns them, computed by Flink (a JVM per call)."""
    folder = tmp_path_factory.mktemp("keygroups")
    (folder / "KeyGroups.java").write_text(_JAVA)
    subprocess.run(["javac", "-cp", flink_job_server_jar, "KeyGroups.java"], cwd=folder,
                   check=True, capture_output=True)

    def run(parallelism, keys):
        out = subprocess.run(["java", "-cp", f"{flink_job_server_jar}:{folder}", "KeyGroups",
                              str(parallelism), *[k.hex() for k in keys]],
                             check=True, capture_output=True, text=True).stdout.split()
        return int(out[0]), [int(x) for x in out[1:]]
    return run


@pytest.mark.parametrize("parallelism", [1, 2, 3, 8, 200])
def test_random_keys_land_where_flink_puts_them(flink_subtasks, parallelism):
    rng = random.Random(parallelism)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) for _ in range(400)]
    groups, want = flink_subtasks(parallelism, keys)
    assert groups == default_max_parallelism(parallelism)
    assert [subtask_of_key(k, parallelism) for k in keys] == want


def test_placed_reader_names_and_ps_shards(flink_subtasks):
    names = placed_names("/data/examples/*.avro", 4, 4)
    encoded = [len(n.encode()).to_bytes(1, "big") + n.encode() for n in names]
    assert flink_subtasks(4, encoded)[1] == [0, 1, 2, 3]
    assert [subtask_of_str(n, 4) for n in names] == [0, 1, 2, 3]
    shards = list(range(300))  # varints of one and two bytes
    assert flink_subtasks(2, [_varint(s) for s in shards])[1] == [
        subtask_of_int(s, 2) for s in shards]


def _varint(n: int) -> bytes:
    """Beam's VarIntCoder bytes of a non-negative int (written here, not imported: the test
    checks the module's own encoding against Flink)."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))
