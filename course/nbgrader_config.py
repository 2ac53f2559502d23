"""nbgrader configuration of the qcourse course (the course root is this folder)."""
import os

from nbgrader.preprocessors import GetGrades
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor

from qcourse.feedback import HideHiddenTests

c = get_config()  # noqa: F821 (provided by traitlets when nbgrader loads this file)
root = os.path.dirname(os.path.abspath(__file__))

c.CourseDirectory.course_id = "qcourse"
c.CourseDirectory.root = root
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(root, "gradebook.db")
c.Exchange.root = os.path.join(root, "exchange")  # inside the course: nothing written to /usr or /srv

# Per-cell timeout well above nbgrader's 30 s default (a lab cell may train for a minute).
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# Safety net: stderr lines that are only library warnings are dropped before grading (a graded
# cell that writes to stderr scores 0). The labs' set-up cell silences them in the first place.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"(?s)^(?:[^\n]*(?:Warning|WARNING|warn\()[^\n]*\n?)+$"

# Feedback never shows hidden tests: neither their source nor their tracebacks.
c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]

# Submissions may not change the kernel, and outputs stay small.
c.LimitOutput.max_lines = 500
c.LimitOutput.max_traceback = 50

# Each submission's kernel runs boxed (qcourse/sandbox.py): bubblewrap where present, with
# these limits; nbgrader's own per-cell timeout is c.Execute.timeout above.
c.QCourseSandbox.memory_mb = 6144
c.QCourseSandbox.cpu_seconds = 900
c.QCourseSandbox.processes = 256
c.QCourseSandbox.file_mb = 512
c.QCourseSandbox.wall_seconds = 900

# The boxed kernel has a network namespace of its own: grader and kernel talk over unix sockets.
c.KernelManager.transport = "ipc"

# Which cell is running, so that a cell that kills the kernel can be skipped and the rest graded.
from qcourse.sandbox import record_cell_start  # noqa: E402

c.Execute.on_cell_start = record_cell_start
