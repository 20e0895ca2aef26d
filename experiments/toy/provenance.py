"""What a stored toy base records about the code that made it."""
import subprocess


def commit() -> str:
    """HEAD, marked "+changes" when the working tree differs from it (the record must say so)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
