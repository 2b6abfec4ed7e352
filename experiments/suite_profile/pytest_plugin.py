"""Per test (in the pytest process): CPU seconds of its own and of the subprocesses it waited
for, and what it compiled, appended to SUITE_PROFILE_OUT + '.tests'."""

import json
import os
import resource

import pytest
import recorder


def _cpu(who):
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  before = dict(recorder.TOTALS)
  cpu, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
  yield
  record = {k: recorder.TOTALS[k] - before[k] for k in before}
  record.update(
    nodeid=item.nodeid,
    cpu_s=_cpu(resource.RUSAGE_SELF) - cpu,
    subprocess_cpu_s=_cpu(resource.RUSAGE_CHILDREN) - children,
  )
  with open(os.environ["SUITE_PROFILE_OUT"] + ".tests", "a") as out:
    out.write(json.dumps(record) + "\n")
