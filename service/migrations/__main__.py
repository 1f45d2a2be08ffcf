"""Write a new revision of the job store's schema: what Alembic's autogenerate finds between
the models (service/store.py) and a store at the newest revision.

    .venv/bin/python -m service.migrations "what changed" sqlite:///jobs.db
"""

import sys

from alembic import command
from sqlalchemy import create_engine

from service.migrations import config_on

if len(sys.argv) != 3:
    sys.exit('usage: python -m service.migrations "MESSAGE" STORE_URL')
with create_engine(sys.argv[2]).begin() as connection:
    command.revision(config_on(connection), message=sys.argv[1], autogenerate=True)
